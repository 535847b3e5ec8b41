"""Engine-side dataclasses -> protobuf replies (the only place the two meet)."""
from __future__ import annotations

import enum
from typing import Any, Mapping

from clients.pb import generation_pb2 as gen_pb
from clients.pb import info_pb2 as info_pb
from server.engine.api import FinishReason, ModelInfo, RoutingPolicyState, Usage
from server.moe.load_stats import ExpertLoadSnapshot, balancedness

FINISH_REASONS = {
    FinishReason.LENGTH: gen_pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: gen_pb.FINISH_REASON_STOP,
    FinishReason.CANCELLED: gen_pb.FINISH_REASON_CANCELLED,
}


def _json_value(value: Any) -> Any:
    """Policy parameters -> what google.protobuf.Struct can hold."""
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, enum.Enum):
        return _json_value(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _balancedness_pb(stats: Mapping[str, float | None]) -> info_pb.Balancedness:
    return info_pb.Balancedness(**{k: v or 0.0 for k, v in stats.items()})


def usage_to_pb(usage: Usage, total_time_s: float) -> gen_pb.Usage:
    return gen_pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                        time_to_first_token_s=usage.time_to_first_token_s, total_time_s=total_time_s)


def routing_policy_to_pb(state: RoutingPolicyState) -> info_pb.RoutingPolicyInfo:
    msg = info_pb.RoutingPolicyInfo(name=state.name, guarantee=state.guarantee,
                                    counters_reset_unix_s=state.counters_reset_unix_s, since_engine_step=state.since_step)
    msg.params.update(_json_value(dict(state.params)))
    return msg


def model_info_to_pb(info: ModelInfo, routing: RoutingPolicyState) -> info_pb.ModelInfo:
    msg = info_pb.ModelInfo(
        model_name=info.model_name, architecture=info.architecture, num_layers=info.num_layers,
        num_moe_layers=info.num_moe_layers, num_experts=info.num_experts, top_k=info.top_k,
        hidden_size=info.hidden_size, vocab_size=info.vocab_size, max_model_len=info.max_model_len,
        dtype=info.dtype, device=info.device, ep_size=info.ep_size, eos_token_ids=list(info.eos_token_ids),
    )
    msg.routing.CopyFrom(routing_policy_to_pb(routing))
    return msg


def expert_load_to_pb(snap: ExpertLoadSnapshot, seconds_since_reset: float, reset: bool) -> info_pb.ExpertLoad:
    rank_rows = snap.rank_tokens()  # [layer][rank]
    expert_mm, rank_mm, ranks_per_token = snap.expert_max_over_mean(), snap.rank_max_over_mean(), snap.mean_ranks_per_token()
    active = snap.rank_active_experts()  # [layer][rank]
    rank_bal, expert_bal = balancedness(rank_rows), balancedness(snap.expert_tokens)  # [layer], None when idle
    layers = [
        info_pb.LayerExpertLoad(
            layer=i, expert_tokens=row, rank_tokens=rank_rows[i], tokens=snap.tokens[i],
            expert_max_over_mean=expert_mm[i], rank_max_over_mean=rank_mm[i],
            mean_ranks_per_token=ranks_per_token[i], rank_active_experts=active[i],
            rank_balancedness=rank_bal[i] or 0.0, expert_balancedness=expert_bal[i] or 0.0,
        )
        for i, row in enumerate(snap.expert_tokens)
    ]
    summary = snap.summary()
    agg = snap.balancedness()
    return info_pb.ExpertLoad(
        num_layers=snap.num_layers, num_experts=snap.num_experts, ep_size=snap.ep_size, layers=layers,
        rank_totals=[sum(col) for col in zip(*rank_rows)] if rank_rows else [0] * snap.ep_size,
        summary=info_pb.ExpertLoadSummary(
            expert_max_over_mean=summary["expert_max_over_mean"], rank_max_over_mean=summary["rank_max_over_mean"],
            mean_ranks_per_token=summary["mean_ranks_per_token"], tokens_per_layer=summary["tokens"],
            rank_balancedness=_balancedness_pb(agg["rank"]), expert_balancedness=_balancedness_pb(agg["expert"]),
        ),
        seconds_since_reset=seconds_since_reset, reset=reset, engine_step=snap.engine_step,
    )
