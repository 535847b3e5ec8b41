"""epserve-bench's static (kernel-level) mode on CPU with the tiny model: the real command in a
subprocess, checked for real measurements (not placeholders): timings positive and consistent,
loads that add up to the tokens the workload routed, transformers beside it on the same
weights, files written."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["bench.mode=static", "model=tiny", "bench.batch=4", "bench.input_len=8", "bench.output_len=4", "bench.small_batch=2",
        "bench.repeats=2", "bench.policy_cost_repeats=5", "bench.moe_timing_steps=2"]
B, L, O, REPEATS, K, LAYERS, E = 4, 8, 4, 2, 2, 4, 16  # tiny: top-2 of 16 experts, 4 MoE layers


def _bench(tmp_path: Path, *args: str, timeout: int = 600, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **env_vars}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, "-m", "server.bench", *args, f"bench.out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_run(doc: dict, ep: int) -> None:
    e = doc["epserve"]
    assert _positive(e["prefill_tok_s"]) and _positive(e["decode_tok_s"])
    assert len(e["prefill_s"]) == REPEATS and all(_positive(t) for t in e["prefill_s"] + e["decode_s"])
    assert math.isclose(e["decode_tok_s"], B * (O - 1) / sorted(e["decode_s"])[len(e["decode_s"]) // 2], rel_tol=0.5)
    assert doc["small_batch"]["batch"] == 2 and _positive(doc["small_batch"]["decode_tok_s"])
    moe = doc["moe_ms_per_layer"]
    assert len(moe["prefill"]) == LAYERS and len(moe["decode"]) == LAYERS and all(_positive(t) for t in moe["prefill"] + moe["decode"])
    load = doc["load"]
    routed = REPEATS * (B * L + B * (O - 1))  # tokens per layer over the timed generations
    assert all(sum(row) == routed * K for row in load["expert_tokens"])
    assert len(load["rank_tokens"][0]) == ep and all(sum(row) == routed * K for row in load["rank_tokens"])
    assert load["tokens"] == routed
    assert 1.0 <= load["mean_ranks_per_token"] <= min(ep, K)
    assert load["expert_max_over_mean"] >= 1.0
    assert all(_positive(doc["policy_cost_us"][p]["us"]) for p in ("decode", "prefill"))
    assert doc["policy_cost_us"]["prefill"]["rows"] == B // ep * L
    assert doc["parallel"]["ep_size"] == ep and doc["workload"]["batch"] == B


def test_bench_multirun_on_cpu_writes_real_measurements(tmp_path):
    proc = _bench(tmp_path, "-m", "routing=natural,greedy_balanced", *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")}
    assert set(runs) == {"tiny-single-natural", "tiny-single-greedy_balanced"}
    for doc in runs.values():
        _check_run(doc, ep=1)
        hf = doc["hf"]
        assert _positive(hf["prefill_tok_s"]) and _positive(hf["decode_tok_s"]) and hf["cache"] == "static"
        assert doc["speedup_vs_hf"]["decode"] == pytest.approx(doc["epserve"]["decode_tok_s"] / hf["decode_tok_s"])
        assert "python -m server.bench" in doc["command"] and doc["routing"]["name"] in doc["command"]
    # transformers is measured once per process and shared by the policies of a multirun
    assert runs["tiny-single-natural"]["hf"]["measured_in_run"] == runs["tiny-single-greedy_balanced"]["hf"]["measured_in_run"]
    # natural routing on the same fp32 weights: transformers picks the same first token for every sequence
    assert runs["tiny-single-natural"]["hf"]["first_token_agreement"] == 1.0
    # balancing flattens the per-expert load the natural router leaves uneven
    assert runs["tiny-single-greedy_balanced"]["load"]["expert_max_over_mean"] < runs["tiny-single-natural"]["load"]["expert_max_over_mean"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| tiny-single-natural |" in summary and "| tiny-single-greedy_balanced |" in summary
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 2
    for png in ("throughput.png", "tiny-single-natural_load.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _check_roofline(runs)
    assert "| run | model | prefill tok/s |" in proc.stdout.strip().splitlines()[-4]  # the table is printed last
    assert "| tiny-single-natural | tiny (4 layers) |" in proc.stdout  # the depth, since shapes may be cut short


def _check_roofline(runs: dict) -> None:
    """The decode step's memory roofline, against figures worked out here from the checkpoint and
    config (float32 tiny model: 4 layers, GQA 2 x 32 KV dims, experts 3 x 128 x 64)."""
    from safetensors import safe_open

    with safe_open(str(ROOT / "server/assets/tiny/model.safetensors"), "pt") as f:
        dense = sum(f.get_tensor(k).numel() * 4 for k in f.keys() if ".mlp.experts." not in k and "embed_tokens" not in k)
    hidden, kv_per_token, expert = 128, LAYERS * 2 * 2 * 32 * 4, 3 * 128 * 64 * 4
    for tag, doc in runs.items():
        r = doc["decode_roofline"]
        assert r["weight_bytes"] == dense + B * hidden * 4, tag  # the embedding: the step's B rows only
        assert r["kv_bytes"] == kv_per_token * B * (L + O / 2), tag  # mean context over the O - 1 steps
        assert LAYERS * K <= r["active_experts_per_step"] <= LAYERS * min(E, B * K), tag
        assert r["expert_bytes"] == pytest.approx(r["active_experts_per_step"] * expert), tag
        assert r["roofline_ms"] == pytest.approx(r["bytes_per_step"] / r["copy_gb_s"] / 1e6) and _positive(r["copy_gb_s"])
        assert r["x_roofline"] == pytest.approx(r["roofline_ms"] / doc["epserve"]["decode_step_ms"])
    # greedy_balanced gives each of the B*K = 8 pairs of a layer its own expert: 8 active per layer
    assert runs["tiny-single-greedy_balanced"]["decode_roofline"]["active_experts_per_step"] == LAYERS * B * K


def test_bench_ep2_over_gloo(tmp_path):
    proc = _bench(tmp_path, "parallel=ep2", "routing=round_robin_balanced", *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "runs" / "tiny-ep2-round_robin_balanced.json").read_text())
    _check_run(doc, ep=2)
    assert doc["hf"] is None and doc["device"]["count"] == 2
    assert doc["decode_roofline"] is None  # one rank's reads are not the step's past ep_size 1
    assert "eager" in doc["epserve"]["graphs"]


def test_bench_config_error_names_the_key(tmp_path):
    proc = _bench(tmp_path, "parallel=ep2", *TINY[:2], "bench.batch=5")
    assert proc.returncode == 2
    assert "bench.batch=5" in proc.stderr and "ep_size=2" in proc.stderr
    assert not (tmp_path / "runs").exists()
