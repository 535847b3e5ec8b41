"""routing=record / routing=replay: trace file round trips, replay of recorded ids (one step,
many steps, EP rank offsets, through the real tiny model), shape-mismatch refusal and the
popularity remap, and the policy contract for both."""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.config import AppConfig, ConfigError, ModelConfig
from server.model.loader import load_model, read_model_spec
from server.moe.routing import PolicyConfigError, RoutingContext, build_policy
from server.moe.routing.replay import remapped_probabilities
from server.moe.routing.trace_file import TraceError, read_trace
from server.routing_setup import build_routing_policy
from tests.helpers.paged_driver import PagedDriver
from tests.config.test_config import composed

ROOT = Path(__file__).resolve().parents[2]


def router_outputs(n: int, num_experts: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_experts, generator=g)  # [N, E]
    weights, ids = logits.softmax(-1).topk(k, dim=-1)  # [N, k]
    return ids.to(torch.int32), weights, logits


def record_steps(path: Path, steps: list[list[int]], num_layers: int = 3, num_experts: int = 16, top_k: int = 2,
                 flush_tokens: int = 64) -> dict[tuple[int, int, int], torch.Tensor]:
    """Record `steps` (per step: tokens per EP rank) -> {(step, layer, rank): natural ids}."""
    ep = len(steps[0])
    recorders = [build_policy("record", path=str(path), flush_tokens=flush_tokens) for _ in range(ep)]
    seen = {}
    for s, counts in enumerate(steps):
        for layer in range(num_layers):
            for rank, n in enumerate(counts):
                ctx = RoutingContext(layer=layer, num_experts=num_experts, top_k=top_k, ep_rank=rank, ep_size=ep,
                                     token_offset=sum(counts[:rank]))
                ids_in, w, logits = router_outputs(n, num_experts, top_k, seed=1000 * s + 10 * layer + rank)
                out, w_out = recorders[rank](ids_in, w, logits, ctx)
                assert torch.equal(out, ids_in) and torch.equal(w_out, w)  # natural routing, untouched
                seen[(s, layer, rank)] = out
    for r in recorders:
        r.close()
    return seen


def test_trace_file_round_trip_with_flushes_and_empty_calls(tmp_path):
    path = tmp_path / "t.eptrace"
    steps = [[50], [0], [7], [200], [1]]  # 200 > flush_tokens: written straight through
    seen = record_steps(path, steps, flush_tokens=64)
    trace = read_trace(path)
    assert (trace.header.num_experts, trace.header.top_k, trace.header.id_dtype) == (16, 2, "uint8")
    assert trace.num_layers == 3 and trace.num_steps == len(steps)
    assert [c for c in trace.calls if c[1] == 0] == [(s, 0, n[0]) for s, n in enumerate(steps)]
    for layer in range(3):
        want = torch.cat([seen[(s, layer, 0)] for s in range(len(steps))])
        assert torch.equal(trace.layers[layer], want)


def test_truncated_trace_is_reported(tmp_path):
    path = tmp_path / "t.eptrace"
    record_steps(path, [[30], [30]])
    data = path.read_bytes()
    (tmp_path / "cut.eptrace").write_bytes(data[:-5])
    with pytest.raises(TraceError, match="truncated"):
        read_trace(tmp_path / "cut.eptrace")
    (tmp_path / "junk.eptrace").write_bytes(b"not a trace at all")
    with pytest.raises(TraceError, match="magic"):
        read_trace(tmp_path / "junk.eptrace")
    with pytest.raises(PolicyConfigError, match="routing.path.*truncated"):
        build_policy("replay", path=str(tmp_path / "cut.eptrace"))


def test_one_step_replays_exactly_across_rank_offsets(tmp_path):
    """One recorded step replayed on 4 ranks: each rank's replay (stateless, rows from its
    token_offset) gives back exactly its slice of the recorded stream."""
    path = tmp_path / "t.eptrace"
    counts = [5, 0, 11, 2]
    seen = record_steps(path, [[sum(counts)]])  # recorded as one stream on one rank
    replay = build_policy("replay", path=str(path))
    replay.validate(16, 2, 4, num_layers=3)
    for layer in range(3):
        for rank, n in enumerate(counts):
            off = sum(counts[:rank])
            ctx = RoutingContext(layer=layer, num_experts=16, top_k=2, ep_rank=rank, ep_size=4, token_offset=off)
            ids_in, w, logits = router_outputs(n, 16, 2, seed=99)
            out, w_out = replay(ids_in, w, logits, ctx)
            assert torch.equal(out, seen[(0, layer, 0)][off:off + n])
            assert torch.equal(w_out, w)  # weights=keep: the router's weights by slot


def test_advance_replays_every_step_of_per_rank_traces(tmp_path):
    steps = [[6, 3], [1, 1], [0, 9], [4, 0]]
    seen = record_steps(tmp_path / "t.rank{rank}.eptrace", steps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.rank0.eptrace", "t.rank1.eptrace"]
    replay = build_policy("replay", path=str(tmp_path / "t.rank{rank}.eptrace"), advance=True)
    replay.validate(16, 2, 2, num_layers=3)
    replay = pickle.loads(pickle.dumps(replay))  # what spawned EP workers receive
    for s, counts in enumerate(steps):
        for layer in range(3):
            for rank, n in enumerate(counts):
                ctx = RoutingContext(layer=layer, num_experts=16, top_k=2, ep_rank=rank, ep_size=2, token_offset=sum(counts[:rank]))
                ids_in, w, logits = router_outputs(n, 16, 2, seed=5)
                out, _ = replay(ids_in, w, logits, ctx)
                assert torch.equal(out, seen[(s, layer, rank)]), (s, layer, rank)
    replay.reset()
    ctx = RoutingContext(layer=0, num_experts=16, top_k=2, ep_rank=0, ep_size=2)
    assert torch.equal(replay(*router_outputs(6, 16, 2, 0), ctx)[0], seen[(0, 0, 0)])


def test_record_then_replay_through_the_tiny_model(tmp_path):
    """Real serving path: prefill + decode with routing=record, then the same work with
    routing=replay(advance) gives identical logits and expert loads."""
    cfg = ModelConfig()
    spec = read_model_spec(cfg)
    path = tmp_path / "tiny.eptrace"
    prompts = [(0, list(b"def f(x):\n    return")), (1, list(b"import os\n"))]

    def run(policy):
        model = load_model(cfg, policy=policy)
        driver = PagedDriver(model, block_size=8)
        outs = [driver.step(prompts)]
        for _ in range(3):
            outs.append(driver.step([(sid, [int(outs[-1][sid].argmax())]) for sid, _ in prompts]))
        return outs, model.load_counters.snapshot()

    record = build_routing_policy(AppConfig.from_dict(composed("routing=record", f"routing.path={path}")).routing,
                                  num_experts=spec.num_experts, top_k=spec.top_k, ep_size=1)
    recorded, rec_load = run(record)
    record.close()
    trace = read_trace(path)
    assert trace.num_layers == spec.num_moe_layers and trace.num_steps == 4
    replay = build_policy("replay", path=str(path), advance=True)
    replay.validate(spec.num_experts, spec.top_k, 1, num_layers=spec.num_moe_layers)
    replayed, rep_load = run(replay)
    for a, b in zip(recorded, replayed):
        for sid in a:
            assert torch.equal(a[sid], b[sid])
    assert rec_load.expert_tokens == rep_load.expert_tokens


def test_mismatch_is_refused_with_the_keys_named(tmp_path):
    path = tmp_path / "t.eptrace"
    record_steps(path, [[20]])
    app = AppConfig.from_dict(composed("routing=replay", f"routing.path={path}"))
    with pytest.raises(ConfigError, match=r"num_experts: model 64, trace 16; top_k: model 4, trace 2.*routing.on_mismatch=remap"):
        build_routing_policy(app.routing, num_experts=64, top_k=4, ep_size=1)
    with pytest.raises(PolicyConfigError, match="MoE layers: model 5, trace 3"):
        build_policy("replay", path=str(path)).validate(16, 2, 1, num_layers=5)
    with pytest.raises(ConfigError, match="MoE layers: model 5, trace 3"):  # start-up passes the layer count
        build_routing_policy(app.routing, num_experts=16, top_k=2, ep_size=1, num_layers=5)
    # Without the layer count at start-up, the first call of a layer the trace lacks refuses.
    replay = build_policy("replay", path=str(path))
    with pytest.raises(PolicyConfigError, match="3 MoE layers"):
        replay(*router_outputs(4, 16, 2, 0), RoutingContext(layer=3, num_experts=16, top_k=2))
    with pytest.raises(PolicyConfigError, match="advance=true.*\\{rank\\}"):
        build_policy("replay", path=str(path), advance=True).validate(16, 2, 2)
    with pytest.raises(PolicyConfigError, match="does not exist"):
        build_policy("replay", path=str(tmp_path / "missing.eptrace"))
    with pytest.raises(PolicyConfigError, match="on_mismatch"):
        build_policy("replay", path=str(path), on_mismatch="ignore")


def test_record_config_errors(tmp_path):
    with pytest.raises(PolicyConfigError, match=r"\{rank\}"):
        build_policy("record", path=str(tmp_path / "t.eptrace")).validate(16, 2, 2)
    with pytest.raises(PolicyConfigError, match="does not exist"):
        build_policy("record", path=str(tmp_path / "nope" / "t.eptrace")).validate(16, 2, 1)
    app = AppConfig.from_dict(composed("routing=record"))
    with pytest.raises(ConfigError, match="routing.path"):
        build_routing_policy(app.routing, num_experts=16, top_k=2, ep_size=1)
    rec = build_policy("record", path=str(tmp_path / "t.eptrace"))
    rec(*router_outputs(3, 16, 2, 0), RoutingContext(layer=0, num_experts=16, top_k=2))
    rec.close()
    with pytest.raises(RuntimeError, match="closed"):
        rec(*router_outputs(3, 16, 2, 0), RoutingContext(layer=0, num_experts=16, top_k=2))


@pytest.mark.parametrize("params, field", [
    ({"flush_tokens": 10**15}, "routing.flush_tokens"),  # a device buffer of 10**15 rows killed the engine
    ({"flush_tokens": 0}, "routing.flush_tokens"),
    ({"seed": 2**64}, "routing.seed"),
    ({"seed": -(2**70)}, "routing.seed"),
])
def test_record_parameters_out_of_range_are_refused(tmp_path, params, field):
    with pytest.raises(PolicyConfigError, match=field):
        build_policy("record", path=str(tmp_path / "t.eptrace"), **params)


def test_release_completes_the_trace_and_closes_its_descriptor(tmp_path):
    """A policy switched away from gives back what it holds: the trace is complete and its
    file descriptor closed at release, not at the process's exit."""
    import os

    path = tmp_path / "t.eptrace"
    rec = build_policy("record", path=str(path), flush_tokens=64)
    rec(*router_outputs(5, 16, 2, 0), RoutingContext(layer=0, num_experts=16, top_k=2))

    def open_on_trace() -> int:
        fds = Path("/proc/self/fd")
        return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))

    assert open_on_trace() == 1
    rec.release()
    assert open_on_trace() == 0 and rec.trace_path == path
    assert read_trace(path).layers[0].shape == (5, 2)  # the buffered rows were written


def test_remap_carries_popularity_to_a_larger_model(tmp_path):
    """E 16 -> 64, k 2 -> 4, 3 -> 8 layers: per-expert max/mean of each layer carries over
    (each recorded expert becomes 4 equally popular ones), ids obey the contract."""
    path = tmp_path / "t.eptrace"
    record_steps(path, [[4000]], num_experts=16, top_k=2)
    trace = read_trace(path)
    replay = build_policy("replay", path=str(path), on_mismatch="remap")
    replay.validate(64, 4, 8, num_layers=8)
    for layer in range(8):
        counts = trace.expert_counts(layer % 3).double()
        want = float(counts.max() / counts.mean())
        ctx = RoutingContext(layer=layer, num_experts=64, top_k=4, ep_rank=0, ep_size=8)
        ids, _ = replay(*router_outputs(8192, 64, 4, 0)[:2], torch.zeros(8192, 64), ctx)
        assert ids.dtype == torch.int32 and int(ids.min()) >= 0 and int(ids.max()) < 64
        assert (ids.sort(dim=1).values.diff(dim=1) != 0).all()
        load = torch.bincount(ids.reshape(-1).long(), minlength=64).double()
        assert abs(float(load.max() / load.mean()) - want) < 0.05 * want
        again, _ = replay(*router_outputs(8192, 64, 4, 0)[:2], torch.zeros(8192, 64), ctx)
        assert torch.equal(ids, again)


def test_remapped_probabilities_cap_and_merge():
    p = remapped_probabilities(torch.tensor([100, 0, 0, 0]), num_experts=8, top_k=4)
    assert abs(float(p.sum()) - 4) < 1e-9 and float(p.max()) <= 1 + 1e-12
    merged = remapped_probabilities(torch.tensor([3, 1, 2, 2]), num_experts=2, top_k=1)
    assert torch.allclose(merged, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("num_experts,top_k,mode", [(16, 2, "exact"), (60, 6, "remap"), (8, 1, "remap")])
def test_replay_contract(tmp_path, num_experts, top_k, mode):
    path = tmp_path / "t.eptrace"
    record_steps(path, [[33]], num_experts=16, top_k=2)
    policy = build_policy("replay", path=str(path), on_mismatch="remap")
    for n in (0, 1, 3, 127, 1000):
        for rank, offset in ((0, 0), (1, n), (3, 7 * n)):
            ctx = RoutingContext(layer=2, num_experts=num_experts, top_k=top_k, ep_rank=rank, ep_size=4, token_offset=offset)
            ids_in, w, logits = router_outputs(n, num_experts, top_k, seed=n)
            ids, _ = policy(ids_in, w, logits, ctx)
            assert ids.shape == (n, top_k) and ids.dtype == torch.int32
            if n:
                assert int(ids.min()) >= 0 and int(ids.max()) < num_experts
                assert (ids.sort(dim=1).values.diff(dim=1) != 0).all()
            assert torch.equal(ids, policy(ids_in, w, logits, ctx)[0]), "not deterministic"


def test_record_and_replay_compose_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "server", "--cfg", "job", "routing=record",
                          "routing.path='/tmp/x.rank{rank}.eptrace'"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: record" in out.stdout and "/tmp/x.rank{rank}.eptrace" in out.stdout


def test_shipped_tiny_trace_gives_a_large_random_model_its_imbalance():
    """The benchmark use: the tiny model's recorded held-out routing (server/assets/tiny) replayed
    by popularity on a random-weight model with 4x the experts and twice the top-k."""
    from server.model.loader import TINY_MODEL_DIR

    trace_path = TINY_MODEL_DIR / "heldout_routing.eptrace"
    trace = read_trace(trace_path)
    shape = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 272, "hidden_size": 32, "num_hidden_layers": 3,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 32,
             "moe_intermediate_size": 8, "num_experts": 64, "num_experts_per_tok": 4}
    cfg = AppConfig.from_dict(composed("routing=replay", f"routing.path={trace_path}", "routing.on_mismatch=remap",
                                       "parallel=ep4"))
    policy = build_routing_policy(cfg.routing, num_experts=64, top_k=4, ep_size=4)
    model = load_model(ModelConfig(name="bench", shape=shape, dtype="float32"), policy=policy)
    PagedDriver(model, num_blocks=300, block_size=16).step([(s, [(s + 7 * i) % 256 for i in range(1000)]) for s in range(4)])
    load = model.load_counters.snapshot()
    for layer, got in enumerate(load.expert_max_over_mean()):
        counts = trace.expert_counts(layer % trace.num_layers).double()
        want = float(counts.max() / counts.mean())
        assert abs(got - want) < 0.1 * want, (layer, got, want)


def test_replay_reads_the_routed_experts_layout(tmp_path) -> None:
    """GenerateResponse.routed_experts bytes ([tokens, layers, k] little-endian uint16) replay
    exactly; a file that does not form whole rows, or a missing shape key, is a config error."""
    from server.moe.routing import PolicyConfigError, RoutingContext, build_policy

    rows = torch.randint(0, 16, (9, 3, 2), dtype=torch.int32)
    path = tmp_path / "routed.u16"
    path.write_bytes(rows.numpy().astype("<u2").tobytes())
    policy = build_policy("replay", path=str(path), layout="routed_experts", num_layers=3, top_k=2)
    policy.validate(16, 2, 1, 3)
    with pytest.raises(PolicyConfigError, match="MoE layers"):
        policy.validate(16, 2, 1, 4)
    for layer in range(3):
        ctx = RoutingContext(layer=layer, num_experts=16, top_k=2)
        ids, _ = policy(torch.zeros(9, 2, dtype=torch.int32), torch.ones(9, 2), torch.zeros(9, 16), ctx)
        assert torch.equal(ids, rows[:, layer])
    with pytest.raises(PolicyConfigError, match="num_layers"):
        build_policy("replay", path=str(path), layout="routed_experts", top_k=2)
    with pytest.raises(PolicyConfigError, match="do not form rows"):
        build_policy("replay", path=str(path), layout="routed_experts", num_layers=4, top_k=2)
