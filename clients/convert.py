"""Keyword arguments -> GenerateRequest, and protobuf replies -> the client's dataclasses."""
from __future__ import annotations

import sys
from array import array
from typing import Any, Sequence

from google.protobuf import json_format

from .errors import InvalidRequestError
from .pb import generation_pb2 as gen_pb
from .pb import info_pb2 as info_pb
from .types import (
    Chunk, ExpertLoad, FinishReason, LayerExpertLoad, ModelInfo, RoutingPolicyInfo,
    ServerInfo, ServerStats, ServingState, Usage,
)

_FINISH = {
    gen_pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    gen_pb.FINISH_REASON_STOP: FinishReason.STOP,
    gen_pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
}
_STATE = {
    info_pb.SERVING_STATE_LOADING: ServingState.LOADING,
    info_pb.SERVING_STATE_SERVING: ServingState.SERVING,
    info_pb.SERVING_STATE_DRAINING: ServingState.DRAINING,
    info_pb.SERVING_STATE_FAILED: ServingState.FAILED,
}


def _set(field: str, assign) -> None:
    """Run one field assignment; protobuf's range/type errors become InvalidRequestError."""
    try:
        assign()
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"{field}: {exc}") from None


def build_request(
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    min_tokens: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    prompt_logprobs: bool = False,
    n: int = 1,
    request_id: str = "",
    text_output: bool = True,
    return_routed_experts: bool = False,
    include_prompt: bool = False,
) -> gen_pb.GenerateRequest:
    """Text prompt (str) or token ids (a sequence of ints) plus options -> GenerateRequest.
    Range rules are the server's; only what protobuf cannot even encode is refused here."""
    req = gen_pb.GenerateRequest()
    if isinstance(prompt, str):
        req.text = prompt
    elif isinstance(prompt, (bytes, bytearray)):
        raise InvalidRequestError("prompt: give text as str or token ids as a sequence of ints, not bytes")
    else:
        _set("prompt.token_ids", lambda: req.token_ids.ids.extend(int(i) for i in prompt))
        if not req.HasField("token_ids"):
            req.token_ids.SetInParent()  # an empty id list still selects the token_ids prompt kind
    if max_new_tokens is not None:
        _set("max_new_tokens", lambda: setattr(req, "max_new_tokens", max_new_tokens))
    _set("sampling.temperature", lambda: setattr(req.sampling, "temperature", temperature))
    if top_p is not None:
        _set("sampling.top_p", lambda: setattr(req.sampling, "top_p", top_p))
    _set("sampling.top_k", lambda: setattr(req.sampling, "top_k", top_k))
    _set("sampling.min_p", lambda: setattr(req.sampling, "min_p", min_p))
    if repetition_penalty is not None:
        _set("sampling.repetition_penalty", lambda: setattr(req.sampling, "repetition_penalty", repetition_penalty))
    _set("sampling.presence_penalty", lambda: setattr(req.sampling, "presence_penalty", presence_penalty))
    _set("sampling.frequency_penalty", lambda: setattr(req.sampling, "frequency_penalty", frequency_penalty))
    _set("min_tokens", lambda: setattr(req, "min_tokens", min_tokens))
    if seed is not None:
        _set("sampling.seed", lambda: setattr(req.sampling, "seed", seed))
    if isinstance(stop, str):
        stop = (stop,)
    _set("stop", lambda: req.stop.extend(stop))
    _set("stop_token_ids", lambda: req.stop_token_ids.extend(stop_token_ids))
    req.ignore_eos = bool(ignore_eos)
    if not isinstance(logprobs, bool):  # logprobs=5 would read as True and return only the sampled token's
        raise InvalidRequestError(f"logprobs: True or False (the sampled token's log-probability), got {logprobs!r}")
    req.logprobs = logprobs
    req.top_logprobs = top_logprobs  # the types and ranges are checked in options.py
    req.prompt_logprobs = prompt_logprobs
    if n != 1:
        req.n = n
    _set("request_id", lambda: setattr(req, "request_id", request_id))
    req.output_format = gen_pb.OUTPUT_FORMAT_TEXT_AND_TOKEN_IDS if text_output else gen_pb.OUTPUT_FORMAT_TOKEN_IDS
    req.return_routed_experts = bool(return_routed_experts)
    req.include_prompt = bool(include_prompt)
    return req


def routed_experts_from_pb(msg: gen_pb.RoutedExperts) -> list[list[list[int]]]:
    """uint16 little-endian [rows, layers, k] -> nested lists (no numpy needed)."""
    ids = array("H")
    ids.frombytes(msg.ids)
    if sys.byteorder == "big":
        ids.byteswap()
    layers, k = msg.num_layers, msg.top_k
    flat = ids.tolist()
    per_row = layers * k
    if per_row == 0 or len(flat) % per_row:
        raise ValueError(f"routed_experts: {len(flat)} ids do not form rows of {layers} layers x {k}")
    return [[flat[r + l * k:r + (l + 1) * k] for l in range(layers)] for r in range(0, len(flat), per_row)]


def usage_from_pb(msg: gen_pb.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens, msg.time_to_first_token_s, msg.total_time_s)


def _tops(positions) -> tuple[tuple[tuple[int, float], ...], ...]:
    return tuple(tuple(zip(p.token_ids, p.logprobs)) for p in positions)


def chunk_from_pb(msg: gen_pb.GenerateResponse, logprobs: bool, top: bool = False, prompt: bool = False) -> Chunk:
    """`logprobs`, `top`, `prompt`: what the request asked for (fields it did not ask for stay None;
    prompt log-probabilities only in the message that carries them: a one-token prompt has none)."""
    last = msg.finish_reason != gen_pb.FINISH_REASON_UNSPECIFIED
    has_prompt = prompt and len(msg.prompt_logprobs) > 0
    return Chunk(
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        logprobs=tuple(msg.logprobs) if logprobs else None,
        finish_reason=_FINISH.get(msg.finish_reason) if last else None,
        usage=usage_from_pb(msg.usage) if msg.HasField("usage") else None,
        request_id=msg.request_id,
        routed_experts=routed_experts_from_pb(msg.routed_experts) if msg.HasField("routed_experts") else None,
        top_logprobs=_tops(msg.top_logprobs) if top else None,
        prompt_logprobs=tuple(msg.prompt_logprobs) if has_prompt else None,
        prompt_top_logprobs=_tops(msg.prompt_top_logprobs) if has_prompt and top else None,
        index=msg.index,
    )


def routing_policy_from_pb(msg: info_pb.RoutingPolicyInfo) -> RoutingPolicyInfo:
    return RoutingPolicyInfo(msg.name, struct_to_dict(msg.params), msg.guarantee,
                             msg.counters_reset_unix_s, msg.since_engine_step)


def set_routing_request(name: str, params: dict[str, Any]):
    from .pb import routing_pb2 as routing_pb

    req = routing_pb.SetRoutingPolicyRequest(name=name)
    if params:
        _set("params", lambda: req.params.update(params))
    return req


def struct_to_dict(struct) -> dict[str, Any]:
    """A google.protobuf.Struct as plain Python values (the server judges SetRoutingPolicy params itself)."""
    return _plain(json_format.MessageToDict(struct))


def _plain(value: Any) -> Any:
    """Struct numbers are doubles: give integral ones back as ints (seeds, counts)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def model_info_from_pb(msg: info_pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model_name=msg.model_name, architecture=msg.architecture, num_layers=msg.num_layers,
        num_moe_layers=msg.num_moe_layers, num_experts=msg.num_experts, top_k=msg.top_k,
        hidden_size=msg.hidden_size, vocab_size=msg.vocab_size, max_model_len=msg.max_model_len,
        dtype=msg.dtype, device=msg.device, ep_size=msg.ep_size,
        routing=routing_policy_from_pb(msg.routing),
        eos_token_ids=tuple(msg.eos_token_ids),
    )


def expert_load_from_pb(msg: info_pb.ExpertLoad) -> ExpertLoad:
    layers = tuple(
        LayerExpertLoad(
            layer=l.layer, expert_tokens=tuple(l.expert_tokens), rank_tokens=tuple(l.rank_tokens),
            tokens=l.tokens, expert_max_over_mean=l.expert_max_over_mean,
            rank_max_over_mean=l.rank_max_over_mean, mean_ranks_per_token=l.mean_ranks_per_token,
            rank_active_experts=tuple(l.rank_active_experts), rank_balancedness=l.rank_balancedness,
            expert_balancedness=l.expert_balancedness,
        )
        for l in msg.layers
    )
    s = msg.summary
    return ExpertLoad(
        num_layers=msg.num_layers, num_experts=msg.num_experts, ep_size=msg.ep_size, layers=layers,
        rank_totals=tuple(msg.rank_totals), expert_max_over_mean=s.expert_max_over_mean,
        rank_max_over_mean=s.rank_max_over_mean, mean_ranks_per_token=s.mean_ranks_per_token,
        tokens_per_layer=s.tokens_per_layer, seconds_since_reset=msg.seconds_since_reset, reset=msg.reset,
        engine_step=msg.engine_step, rank_balancedness=_stats(s.rank_balancedness), expert_balancedness=_stats(s.expert_balancedness),
    )


def _stats(msg: info_pb.Balancedness) -> dict[str, float]:
    return {"min": msg.min, "p50": msg.p50, "p90": msg.p90, "avg": msg.avg}


def server_info_from_pb(msg: info_pb.ServerInfo) -> ServerInfo:
    config = {f.name: getattr(msg.config, f.name) for f in msg.config.DESCRIPTOR.fields}
    st = msg.stats
    stats = ServerStats(
        active_calls=st.active_calls, running_sequences=st.running_sequences,
        waiting_sequences=st.waiting_sequences, kv_blocks_used=st.kv_blocks_used,
        kv_blocks_total=st.kv_blocks_total, engine_steps=st.engine_steps,
        requests_by_code=dict(st.requests_by_code), prompt_tokens=st.prompt_tokens,
        completion_tokens=st.completion_tokens,
    )
    return ServerInfo(version=msg.version, uptime_s=msg.uptime_s,
                      state=_STATE.get(msg.state, ServingState.UNKNOWN), config=config, stats=stats)
