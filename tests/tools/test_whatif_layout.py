"""The EP what-if feeds each rank's expert kernel exactly what a real EP run feeds it.

A real EP run over gloo (tests/helpers/whatif_worker.py: the tiny model's shards, the
scheduler's plans through real ModelRunners, the all-gather dispatch) records, per rank,
step and MoE layer, the router output its policy got and the local ids its expert kernel
got. The what-if, given the same router outputs as its routing source, lays out the same
steps with its own offsets, policy calls, EPLB replica choice and dispatch layout; the ids,
row counts and per-expert counts must be identical, for natural, greedy_balanced, natural
with EPLB and rank_balanced (whose ranks the what-if solves as one batch).
"""
from __future__ import annotations

import pytest
import torch

from server.bench.request_sets import build_request_set
from server.bench.whatif.layout import Layouter
from server.bench.whatif.plans import plan_steps
from server.bench.whatif.sources import CapturedSource, RouterOutput
from server.config import ModelConfig
from server.model.loader import read_model_spec
from server.moe.eplb.replica_map import ReplicaMap
from server.moe.eplb.settings import EplbSettings
from server.moe.routing import build_policy
from tests.helpers.ep_ranks import run_on_ranks
from tests.helpers.whatif_worker import record_rank

ENGINE = {"max_num_seqs": 4, "max_num_batched_tokens": 64, "kv_block_size": 16, "kv_cache_tokens": 1024,
          "max_queue": 16}


def _steps(ep: int):
    spec = read_model_spec(ModelConfig(name="tiny"))
    requests = build_request_set("lightllm", batch=6, input_len=10, output_len=3, vocab_size=spec.vocab_size, seed=3)
    return spec, plan_steps(requests, ep_size=ep, **ENGINE)


def _captured(recorded: list[dict], steps) -> CapturedSource:
    """The real run's router outputs, concatenated over ranks in rank order (global token order)."""
    outputs = {}
    for key in recorded[0]["router"]:
        parts = [r["router"][key] for r in recorded]
        outputs[key] = RouterOutput(*(torch.cat([p[i] for p in parts]) for i in range(3)))
    return CapturedSource(outputs)


@pytest.mark.parametrize("ep,policy,redundant", [(2, "natural", None), (2, "greedy_balanced", None),
                                                 (2, "natural", 2), (4, "greedy_balanced", None),
                                                 (4, "natural", 4), (4, "rank_balanced", None)])
def test_whatif_kernel_inputs_equal_a_real_gloo_ep_run(ep, policy, redundant):
    spec, steps = _steps(ep)
    assert any(s.is_decode for s in steps) and not steps[0].is_decode
    recorded = run_on_ranks(record_rank, ep, steps, policy, redundant, ENGINE)
    replicas = None
    if redundant is not None:
        placement = EplbSettings(redundant, None, 0, "global", 1, 1).initial_placement(
            spec.num_moe_layers, spec.num_experts, ep)
        replicas = ReplicaMap(placement)
    layouter = Layouter(build_policy(policy), num_experts=spec.num_experts, top_k=spec.top_k, ep_size=ep,
                        kind="allgather", replicas=replicas)
    source = _captured(recorded, steps)
    compared = 0
    for step in steps:
        for layer in range(spec.num_moe_layers):
            layout = layouter.layout(step, layer, source.router_output(step, layer), rows=step.ranks[0].ep_rows)
            for rank in range(ep):
                real = recorded[rank]["kernel"][(step.index, layer)]
                mine = layout.local_ids(rank)
                assert mine.shape == real.shape, (step.index, layer, rank)
                assert torch.equal(mine, real), (step.index, layer, rank)
                counts = torch.bincount(real[real >= 0].long(), minlength=layout.slots_per_rank)
                assert torch.equal(layout.slot_counts[rank], counts)
                compared += 1
    assert compared == len(steps) * spec.num_moe_layers * ep
