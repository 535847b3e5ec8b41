"""The EP what-if's parts: plans, shape map, sources, wire model, composition, profiles."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from server.bench.request_sets import build_request_set
from server.bench.whatif.compose import PhaseTime, compose_step
from server.bench.whatif.plans import plan_steps
from server.bench.whatif.profiles import available_profiles, read_profile
from server.bench.whatif.rank_timer import RankStepTimes
from server.bench.whatif.run import timed_steps
from server.bench.whatif.shape_map import ShapeMap, synthesized_scores
from server.bench.whatif.wire import available_interconnects, load_interconnect
from server.config import ConfigError
from server.moe.routing import PolicyConfigError, RoutingContext, build_policy


def _plans(ep: int, batch: int = 10, output_len: int = 5):
    requests = build_request_set("lightllm", batch=batch, input_len=12, output_len=output_len, vocab_size=50, seed=1)
    steps = plan_steps(requests, ep_size=ep, max_num_seqs=4, max_num_batched_tokens=24, kv_block_size=16,
                       kv_cache_tokens=2048, max_queue=batch)
    return requests, steps


def test_plans_run_every_position_once_with_consecutive_offsets():
    requests, steps = _plans(ep=3)
    seen = Counter()
    for step in steps:
        offset = 0
        for plan, tokens in zip(step.ranks, step.tokens):
            assert plan.token_offset == offset
            assert tokens.num_tokens == plan.batch.num_tokens
            offset += tokens.num_tokens
            seen.update(zip(tokens.request.tolist(), tokens.position.tolist()))
        assert step.is_decode == all(bool((p.batch.query_lens == 1).all()) for p in step.ranks)
    want = {(i, p) for i, n in enumerate(requests.lengths) for p in range(n + requests.output_len - 1)}
    assert set(seen) == want and set(seen.values()) == {1}
    # a prefill chunk budget of 24 per rank splits these prompts over several steps
    assert sum(not s.is_decode for s in steps) > 1


def test_timed_steps_stand_for_every_decode_step():
    _, steps = _plans(ep=2, batch=4, output_len=12)
    timed = timed_steps(steps, 4)
    decode = [w for s, w in timed if s.is_decode]
    assert len(decode) == 4 and sum(decode) == pytest.approx(sum(s.is_decode for s in steps))
    assert all(w == 1.0 for s, w in timed if not s.is_decode)
    assert len(timed_steps(steps, 0)) == len(steps)


def test_shape_map_keeps_each_block_load_and_gives_distinct_ids():
    shape = ShapeMap(16, 2, 4, 128, 8)
    g = torch.Generator().manual_seed(0)
    src = torch.stack([torch.randperm(16, generator=g)[:2] for _ in range(500)])  # [T, 2]
    keys = torch.arange(500) * 7
    out = shape.expand(src, keys, layer=5)  # [T, 8]
    assert out.shape == (500, 8) and out.dtype == torch.int32
    assert all(len(set(row)) == 8 for row in out.tolist())
    blocks = torch.bincount((out.long() // 8).reshape(-1), minlength=16)
    assert torch.equal(blocks, 4 * torch.bincount(src.reshape(-1), minlength=16))
    assert shape.source_layer(5) == 1
    assert ShapeMap(16, 2, 4, 16, 2).identity
    with pytest.raises(ValueError, match="cannot be carried"):
        ShapeMap(16, 2, 4, 24, 8)


def test_synthesized_scores_rank_the_chosen_experts_first_in_order():
    ids = torch.tensor([[5, 1, 9], [0, 3, 2]], dtype=torch.int32)
    scores = synthesized_scores(ids, 12, torch.tensor([3, 4]), layer=0)
    assert torch.equal(scores.topk(3, dim=1).indices.int(), ids)


def test_wire_model_inside_and_across_nodes():
    ib = load_interconnect("ib400_h100")
    gb = 1e9
    inside = ib.seconds("all_gather", 8, gb)
    assert inside == pytest.approx(10e-6 + 7 / 8 * gb / 370e9)
    across = ib.seconds("all_to_all", 32, gb)
    assert across == pytest.approx(30e-6 + max(7 / 32 * gb / 370e9, 24 / 32 * gb / 48e9))
    assert ib.seconds("all_gather", 1, gb) == 0.0
    one_node = load_interconnect("h200_nvswitch")
    assert one_node.max_ep() == 8
    with pytest.raises(ConfigError, match="ib400_h100"):
        one_node.seconds("all_gather", 16, gb)
    assert {"h100_nvswitch", "h200_nvswitch", "ib400_h100"} <= set(available_interconnects())
    with pytest.raises(ConfigError, match="shipped"):
        load_interconnect("nope")


def test_wire_profile_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus_per_node: 8\nintra:\n  all_gather: {latency_us: 1, bus_bw_gbps: 0}\n"
                   "  all_to_all: {latency_us: 1, bus_bw_gbps: 1}\n")
    with pytest.raises(ConfigError, match="intra.all_gather"):
        load_interconnect(str(bad))


def test_compose_takes_the_slowest_rank_of_every_segment():
    local = [RankStepTimes(1.0, 0.5, 0.2), RankStepTimes(1.5, 0.4, 0.3)]
    experts = np.array([[2.0, 1.0], [0.5, 3.0], [1.0, 1.0]])  # [3 MoE layers, 2 ranks]
    st = compose_step(local, experts, wire_per_layer_ms=0.25, dense_layers=1)
    assert st.local_ms == pytest.approx(max(1.0 + 0.2 + 0.5, 1.5 + 0.3 + 0.4) + 2 * 0.5)
    assert st.expert_ms == pytest.approx(2.0 + 3.0 + 1.0)
    assert st.expert_mean_ms == pytest.approx(1.5 + 1.75 + 1.0)
    assert st.wire_ms == pytest.approx(0.75)
    assert st.total_ms == pytest.approx(st.local_ms + 6.0 + 0.75)
    assert st.ceiling_ms == pytest.approx(st.total_ms - (6.0 - 4.25))
    assert st.critical == [0, 1, 0]
    phase = PhaseTime()
    phase.add(st, 2.0)
    s = phase.summary(tokens=100)
    assert s["step_ms"] == pytest.approx(st.total_ms) and s["tok_s"] == pytest.approx(100 / (2 * st.total_ms / 1e3))


def test_eager_step_takes_the_longer_of_the_host_and_device_chains():
    """A launch-bound eager step: the host issues slower than the GPUs run, so the step is the
    host chain and the wait for the slowest rank's experts hides behind it; a GPU-bound one
    is the device chain as before."""
    experts = np.array([[2.0, 1.0], [0.5, 3.0]])  # [2 MoE layers, 2 ranks]
    slow_host = [RankStepTimes(1.0, 0.5, 0.0, host_edge_ms=2.0, host_moe_layer_ms=4.0),
                 RankStepTimes(1.0, 0.5, 0.0, host_edge_ms=1.0, host_moe_layer_ms=3.0)]
    st = compose_step(slow_host, experts, wire_per_layer_ms=0.0, dense_layers=0, expert_host_ms=0.5)
    assert st.device_ms == pytest.approx(1.0 + 2 * 0.5 + 5.0)
    assert st.host_ms == pytest.approx(2.0 + 2 * (4.0 + 0.5)) and st.host_local_ms == pytest.approx(10.0)
    assert st.total_ms == pytest.approx(11.0) and st.host_excess_ms == pytest.approx(4.0)
    assert st.ceiling_ms == pytest.approx(11.0) and st.straggler_ms == 0.0  # balance buys nothing here
    assert st.local_alone_ms == pytest.approx(10.0)
    fast_host = [RankStepTimes(1.0, 0.5, 0.0, host_edge_ms=0.2, host_moe_layer_ms=0.3)] * 2
    st = compose_step(fast_host, experts, wire_per_layer_ms=0.0, dense_layers=0, expert_host_ms=0.1)
    assert st.total_ms == pytest.approx(st.device_ms) and st.host_excess_ms == 0.0
    assert st.ceiling_ms == pytest.approx(st.device_ms - (5.0 - 3.25)) and st.local_alone_ms == pytest.approx(2.0)
    summary = PhaseTime(steps=[(st, 1.0)]).summary(tokens=10)
    b = summary["breakdown_ms"]
    assert b["local"] + b["experts"] + b["wire"] + b["host_excess"] == pytest.approx(summary["time_ms"])


def test_profiles_ship_with_sources_and_bad_names_list_them():
    names = available_profiles()
    assert {"trtllm_r1_ep32_decode", "aic_qwen3_power_law", "aic_dsv3_power_law"} <= set(names)
    for name in names:
        prof = read_profile(name)
        assert "Source" in open(prof["path"]).read()
    with pytest.raises(ConfigError, match="aic_qwen3_power_law"):
        read_profile("no_such_profile")


def test_skewed_power_law_shape_is_used_as_given():
    ctx = RoutingContext(layer=2, num_experts=64, top_k=4, ep_size=8)
    a = build_policy("skewed", mode="power_law", shape=1.2, seed=3)
    b = build_policy("skewed", mode="power_law", shape=1.2, seed=3)
    p = a.probabilities(ctx)
    assert p == b.probabilities(ctx) and sum(p) == pytest.approx(4) and max(p) <= 1.0
    flatter = build_policy("skewed", mode="power_law", shape=2.5, seed=3).probabilities(ctx)
    assert max(flatter) < max(p)  # a steeper power law concentrates its draws near 1: less skew
    ids = a.route(torch.zeros(50, 4, dtype=torch.int32), None, None, ctx)
    assert all(len(set(r)) == 4 for r in ids.tolist())
    with pytest.raises(PolicyConfigError, match="routing.shape"):
        build_policy("skewed", mode="hot_ranks", shape=1.0)


def test_engines_the_whatif_builds_size_their_own_kv_cache(monkeypatch):
    """The what-if's probes and expert timers already hold the device when it records routing or
    validates against the engine: an engine sized as a fraction of free memory would find none
    (seen on an H100). Both engines it builds must size the cache from the workload."""
    import server.core.startup as startup
    from server.bench.whatif.recorded import record_routed_experts
    from server.config import ModelConfig

    built = []

    def capture(app):
        built.append(app)
        raise RuntimeError("captured")

    monkeypatch.setattr(startup, "build_engine_core", capture)
    requests = build_request_set("lightllm", batch=4, input_len=8, output_len=3, vocab_size=50, seed=1)
    with pytest.raises(RuntimeError, match="captured"):
        record_routed_experts(ModelConfig(), requests)
    assert built[0].engine.gpu_memory_utilization == 0
    assert built[0].engine.kv_cache_tokens >= 4 * (8 + 3)
