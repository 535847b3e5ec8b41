"""EP-rank side of the what-if's layout test: a real EP run over gloo, watched.

Each rank loads the embedded tiny model's shard (its experts only; with EPLB its slots of
the start-up placement), runs the scheduler's step plans through a real ModelRunner (the
rank path of the engine: staging, forward with the all-gather dispatch, sampler), and
records per (step, MoE layer) what its routing policy was given (the router's top-k, weights
and logits of its rows) and what its expert kernel was given (the gathered rows' local ids).
"""
from __future__ import annotations

import torch

from server.config import ModelConfig
from server.worker.model_runner import ModelRunner
from server.model.loader import load_model
from server.moe.dispatch import DispatchSettings
from server.moe.eplb.settings import EplbSettings
from server.moe.routing import build_policy


class _RecordingPolicy:
    """Wraps a policy; keeps each call's inputs (a forward calls layers in order)."""

    def __init__(self, inner, calls: list) -> None:
        self.inner, self.calls = inner, calls
        self.graph_safe = True

    def __call__(self, topk_ids, topk_weights, router_logits, ctx):
        self.calls.append((ctx.layer, topk_ids.clone(), topk_weights.float().clone(), router_logits.float().clone()))
        return self.inner(topk_ids, topk_weights, router_logits, ctx)


def record_rank(rank: int, ep: int, steps, policy_name: str, redundant: int | None, engine: dict) -> dict:
    """-> {"router": {(step, layer): (ids, weights, logits)}, "kernel": {(step, layer): local ids}}."""
    eplb = None if redundant is None else EplbSettings(redundant, None, 0, "global", 1, 1)
    model = load_model(ModelConfig(name="tiny"), policy=build_policy(policy_name), ep_rank=rank, ep_size=ep,
                       device="cpu", eplb=eplb, dispatch=DispatchSettings("allgather"))
    calls, kernel_calls = [], []
    model.runtime.policy = _RecordingPolicy(model.runtime.policy, calls)
    dispatcher = model.runtime.dispatcher
    run_experts = dispatcher.run_experts

    def recording_experts(experts, hidden, local, weights):
        kernel_calls.append(local.clone())
        return run_experts(experts, hidden, local, weights)

    dispatcher.run_experts = recording_experts
    runner = ModelRunner(model, rank=rank, num_blocks=engine["kv_cache_tokens"] // engine["kv_block_size"],
                         block_size=engine["kv_block_size"], device=torch.device("cpu"),
                         max_num_seqs=engine["max_num_seqs"], max_num_batched_tokens=engine["max_num_batched_tokens"])
    router, kernel = {}, {}
    layers = model.spec.num_moe_layers
    for step in steps:
        calls.clear()
        kernel_calls.clear()
        runner.run(step.ranks[rank])
        assert len(calls) == layers and len(kernel_calls) == layers, (len(calls), len(kernel_calls))
        for layer, (c, k) in enumerate(zip(calls, kernel_calls)):
            assert c[0] == layer
            router[(step.index, layer)] = c[1:]
            kernel[(step.index, layer)] = k
    return {"router": router, "kernel": kernel}
