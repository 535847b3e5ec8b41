"""epserve-bench's engine mode on CPU: the tiny model at ep 2 over gloo through the real
launcher, scheduler and model runner, three policies switched in place and interleaved.

The run's JSON must be complete — every policy and phase with its median, 95% CI, spread and
paired ratio to natural, the balance bound and measured uplift against it, balancedness,
tokens and active experts per rank — and its figures must be real: loads add up to the
tokens the workload routed, round robin balances ranks better than the router does."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.tools.test_bench_cli import _bench

B, SMALL, L, O, K, LAYERS, EP, REPEATS = 4, 2, 8, 3, 2, 4, 2, 5
SMOKE = ["model=tiny", "parallel=ep2", "bench.workload=lightllm", f"bench.batch={B}", f"bench.small_batch={SMALL}",
         f"bench.input_len={L}", f"bench.output_len={O}", "bench.sweep=[1,2]", "bench.sweep_output_len=3",
         "bench.sweep_repeats=2", f"bench.repeats={REPEATS}", "bench.warmup=1", "bench.prefill_runs=1"]
POLICIES = ["natural", "greedy_balanced", "round_robin_balanced"]
PHASES = ["prefill", "decode", "small_decode"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_stat(d: dict, n: int) -> None:
    assert d["n"] == n and len(d["values"]) == n
    lo, hi = d["ci95"]
    assert all(_finite(v) for v in (d["median"], lo, hi, d["ci_half_width_rel"], d["spread_rel"], d["min"], d["max"]))
    assert d["min"] <= lo <= d["median"] <= hi <= d["max"]


def test_engine_mode_ep2_smoke_writes_a_complete_experiment(tmp_path) -> None:
    proc = _bench(tmp_path, *SMOKE, OMP_NUM_THREADS="1")  # one thread per process: the ranks share the cores
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "balance" / "tiny-ep2-lightllm.json").read_text())
    assert doc["policies"] == POLICIES and doc["baseline"] == "natural" and doc["parallel"]["ep_size"] == EP
    assert all(doc["policy_reprs"][p].startswith(p + "(") for p in POLICIES)  # every rank ran the policy asked for
    lengths = doc["workload"]["lengths"]
    assert doc["workload"]["batch"] == B and lengths["distinct"] > 1 and 4 <= lengths["min"] <= lengths["max"] <= 12
    for phase in [*PHASES, "e2e"]:
        for p in POLICIES:
            block = doc["phases"][phase][p]
            _check_stat(block["tok_s"], REPEATS)
            _check_stat(block["ratio_to_natural"], REPEATS)
            assert block["tok_s"]["median"] > 0 and _finite(block["tok_s_per_gpu"]["median"])
            assert math.isclose(block["tok_s_per_gpu"]["median"] * EP, block["tok_s"]["median"])
        assert doc["phases"][phase]["natural"]["ratio_to_natural"]["values"] == [1.0] * REPEATS
    for phase in PHASES:
        for p in POLICIES:
            bal = doc["balance"][phase][p]
            for axis in ("rank", "expert"):
                agg = bal["balancedness"][axis]
                assert all(_finite(agg[k]) and 0 < agg[k] <= 1 for k in ("min", "p50", "p90", "avg"))
                assert agg["min"] <= agg["p50"] <= agg["p90"]
            assert len(bal["tokens_per_rank"]) == EP and len(bal["active_experts_per_rank"]) == EP
            assert all(_finite(v) for v in bal["bound"].values()) and bal["bound"]["speedup_bound"] >= 1.0
            assert all(_finite(v) for v in bal["vs_bound"].values()), (phase, p, bal["vs_bound"])
        # (token, expert) pairs per layer per step, summed over ranks: every token's k picks
        routed = {"prefill": doc["workload"]["prompt_tokens"], "decode": B, "small_decode": SMALL}[phase]
        assert math.isclose(sum(doc["balance"][phase]["natural"]["tokens_per_rank"]), routed * K)
        nat, rr = (doc["balance"][phase][p]["balancedness"]["rank"] for p in ("natural", "round_robin_balanced"))
        assert rr["avg"] >= nat["avg"] and rr["min"] > 0.9  # round robin evens the ranks out in every step
        assert doc["balance"][phase]["natural"]["bound"]["speedup_bound"] > 1.0  # the router leaves ranks uneven
    for p in POLICIES:
        assert set(doc["sweep"][p]) == {"1", "2"}
        for point in doc["sweep"][p].values():
            _check_stat(point["tok_s"], 2)
            _check_stat(point["ratio_to_natural"], 2)
    # natural's counts over its probe run: every prompt and decode token's k picks, in every layer
    routed = doc["workload"]["prompt_tokens"] + B * (O - 1)
    assert len(doc["load"]["expert_tokens"]) == LAYERS and all(sum(r) == routed * K for r in doc["load"]["expert_tokens"])
    from server.moe.eplb.stats import read_expert_load

    assert len(read_expert_load(tmp_path / "balance" / "tiny-ep2-lightllm.json")) == LAYERS  # EPLB reads it
    table = (tmp_path / "balance" / "tiny-ep2-lightllm.md").read_text()
    assert "| decode | round_robin_balanced |" in table and "| small-batch decode | greedy_balanced |" in table
    assert (tmp_path / "balance" / "tiny-ep2-lightllm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| prefill | natural |" in proc.stdout  # the table is printed


def test_engine_mode_refuses_bad_policies_before_starting_ranks(tmp_path) -> None:
    proc = _bench(tmp_path, "model=tiny", "bench.policies=[greedy_balanced]")
    assert proc.returncode == 2 and "bench.policies must include natural" in proc.stderr
    proc = _bench(tmp_path, "model=tiny", "bench.policies=[natural,{name:skewed,target:0.5}]")
    assert proc.returncode == 2 and "bench.policies" in proc.stderr and "target" in proc.stderr
    assert not (tmp_path / "balance").exists()


def test_served_mode_runs_the_workload_through_grpc_beside_in_process(tmp_path) -> None:
    proc = _bench(tmp_path, "model=tiny", "bench.batch=8", "bench.small_batch=0", "bench.input_len=8", "bench.output_len=6",
                  "bench.sweep=[]", "bench.probe=false", "bench.policies=[natural]", "bench.repeats=2",
                  "bench.served=true", "bench.served_clients=2", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "balance" / "tiny-single-fixed.json").read_text())
    served = doc["served"]
    assert served["clients"] == 2 and served["server_exit_code"] == 0
    assert "model=tiny" in served["server_overrides"] and "routing=natural" in served["server_overrides"]
    _check_stat(served["served_tok_s"], 2)
    assert served["in_process_tok_s"]["values"] == doc["phases"]["e2e"]["natural"]["tok_s"]["values"]
    ratio = served["ratio"]
    assert _finite(ratio["ratio"]) and ratio["ratio"] > 0 and ratio["ci95"][0] <= ratio["ratio"] <= ratio["ci95"][1]
    assert math.isclose(ratio["ratio"], served["served_tok_s"]["median"] / served["in_process_tok_s"]["median"])
    assert 0 < served["ttft_p50_s"] < 60
    assert "served / in-process" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_mode_on_one_gpu_decodes_through_graphs_per_policy(tmp_path) -> None:
    proc = _bench(tmp_path, "model=tiny", "bench.batch=16", "bench.small_batch=4", "bench.input_len=16",
                  "bench.output_len=8", "bench.workload=lightllm", "bench.sweep=[1,4]", "bench.repeats=5",
                  CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "balance" / "tiny-single-lightllm.json").read_text())
    assert doc["device"]["type"] == "cuda" and doc["engine"]["decode_graphs"].startswith("captured per policy")
    for phase in PHASES:
        for p in POLICIES:
            _check_stat(doc["phases"][phase][p]["ratio_to_natural"], 5)
            bal = doc["balance"][phase][p]
            assert math.isclose(bal["bound"]["speedup_bound"], 1.0) and bal["vs_bound"]["uplift_over_bound"] is None  # one rank
            assert bal["balancedness"]["rank"]["avg"] == 1.0
