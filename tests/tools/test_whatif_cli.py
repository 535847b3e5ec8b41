"""`epserve-bench bench.mode=whatif` on CPU with the tiny model: the real command in a
subprocess, every variant and phase present, the numbers consistent with each other (the
parts add up to the step, loads add up to the routed pairs, balance guarantees hold), and
the three files written. Also: configuration errors name the key."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
K, E, LAYERS = 2, 16, 4  # the tiny model: top-2 of 16 experts, 4 MoE layers
SMALL = ["bench.mode=whatif", "model=tiny", "bench.batch=8", "bench.input_len=8", "bench.output_len=4",
         "bench.small_batch=2", "bench.whatif_reps=2", "bench.workload=lightllm"]


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, "-m", "server.bench", *args, f"bench.out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.mark.parametrize("ep,extra", [(2, ["bench.routing_source=model", "bench.sweep=[2]"]),
                                      (4, ["bench.routing_source=trace", "bench.sweep=[]", "bench.whatif_decode_steps=1"])])
def test_whatif_writes_every_variant_and_phase_consistently(tmp_path, ep, extra):
    res = _bench(tmp_path, *SMALL, f"parallel.ep_size={ep}", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted((tmp_path / "whatif").iterdir())
    assert {f.suffix for f in files} == {".json", ".md", ".png"}
    doc = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    assert doc["emulated"] and doc["ep_size"] == ep and doc["dispatch"] == "allgather" and doc["measured"]
    variants = ["natural", "greedy_balanced", "round_robin_balanced", "natural+eplb0", f"natural+eplb{ep}"]
    phases = ("prefill", "decode", "small_decode") + (("sweep2_decode",) if doc["workload"]["sweep"] else ())
    assert set(doc["phases"]) == set(phases)  # other sets report their decode only
    for phase in phases:
        assert list(doc["phases"][phase]) == variants, phase
        for label, s in doc["phases"][phase].items():
            b = s["breakdown_ms"]
            assert b["host_excess"] == 0.0  # CPU: the host clock times everything, no separate host chain
            assert math.isclose(b["local"] + b["experts"] + b["wire"], s["time_ms"], rel_tol=1e-9)
            assert s["tok_s"] > 0 and s["step_ms"] > 0 and b["wire"] > 0
            assert len(s["pairs_per_rank"]) == ep and len(s["critical_path"]) == LAYERS
            assert 1.0 <= s["ranks_per_token"] <= min(ep, K)
            assert s["ceiling_speedup"] >= 1.0 - 1e-9 and s["linear_bound"] >= 1.0 - 1e-9
        assert doc["phases"][phase]["natural"]["x_natural"] == 1.0
    prefill = doc["phases"]["prefill"]
    main_pairs = sum(prefill["natural"]["pairs_per_rank"])  # per layer: every prompt token's k pairs
    assert main_pairs == pytest.approx(sum(doc["workload"]["lengths"]) * K)
    # round robin balances ranks within one pair per step (prefill: one step of every prompt)
    assert prefill["round_robin_balanced"]["rank_max_over_mean"] == pytest.approx(1.0, abs=ep / main_pairs + 1e-9)
    # greedy balances each rank's call to within one pair per expert: over ep ranks, within ep
    mean = main_pairs / E
    assert prefill["greedy_balanced"]["balancedness"]["expert"]["min"] >= mean / (mean + ep) - 1e-9
    text = next(f for f in files if f.suffix == ".md").read_text()
    assert "Measured:" in text and "Modelled:" in text and "| decode | greedy_balanced |" in text
    assert doc["model"]["expert_precision"] == "dtype" and "Expert weights: float32 (torch expert path)." in text
    assert "| prefill | natural+eplb0 |" in res.stdout


@pytest.mark.parametrize("overrides,message", [
    (["bench.routing_source=profile"], "bench.profile"),
    (["bench.routing_source=profile", "bench.profile=trtllm_r1_ep32_decode"], "calibrated_ep=32"),
    (["parallel.ep_size=16", "bench.interconnect=h200_nvswitch"], "ib400_h100"),
    (["parallel.ep_size=3"], "parallel.ep_size"),
    (["parallel.dispatch=alltoall"], "parallel.dispatch=alltoall"),
    (["bench.expert_precision=fp8", "parallel.device=cpu"], r"bench.expert_precision=fp8: .*CUDA only"),
])
def test_whatif_config_errors_name_the_key(overrides, message):
    from server.bench.settings import BenchSettings
    from server.bench.whatif.document import run_whatif
    from server.config import ConfigError

    bench = dict(arg.split("=", 1) for arg in SMALL if arg.startswith("bench."))
    data = {"model": {"name": "tiny"}, "parallel": {"ep_size": 2},
            "bench": {k.split(".", 1)[1]: (int(v) if v.isdigit() else v) for k, v in bench.items()}}
    for item in overrides:
        key, value = item.split("=", 1)
        group, name = key.split(".", 1)
        data.setdefault(group, {})[name] = int(value) if value.isdigit() else value
    with pytest.raises(ConfigError, match=message):
        run_whatif(BenchSettings.from_dict(data))


def _validation_settings(**bench):
    from server.bench.settings import BenchSettings

    return BenchSettings.from_dict({"model": {"name": "tiny"}, "parallel": {"ep_size": bench.pop("ep", 1)}, "bench": {
        "mode": "whatif", "batch": 8, "input_len": 8, "output_len": 4, "small_batch": 2, "whatif_reps": 2,
        "workload": "lightllm", "routing_source": "model", "whatif_validate": True, "repeats": 1, "sweep": [],
        "policies": [{"name": "natural"}], "eplb_redundant_per_rank": [], **bench}})


def test_whatif_validation_routes_the_prompts_the_engine_runs(tmp_path):
    """At ep 1 the check against the real engine runs on CPU too; the what-if's routing is the
    model's router on the set's own prompts (the engine's), not on the text prompts."""
    from server.bench.whatif.document import run_whatif

    doc = run_whatif(_validation_settings(out_dir=str(tmp_path)))
    assert "the set's own prompts" in doc["routing_source"], doc["routing_source"]
    # Times on a shared CPU say nothing (the GPU test and the benchmark hold the ratio); here:
    # every phase was run by the engine and predicted, and the figures are consistent.
    for phase in ("prefill", "decode", "small_decode"):
        check = doc["validation"][phase]
        assert check["engine_step_ms"] > 0 and check["predicted_step_ms"] > 0
        assert check["predicted_over_engine"] == pytest.approx(check["predicted_step_ms"] / check["engine_step_ms"])
        assert check["engine_experts_ms"] == pytest.approx(check["engine_step_ms"] - check["engine_local_ms"])
        assert check["predicted_experts_ms"] == pytest.approx(check["predicted_step_ms"] - check["predicted_local_ms"])


@pytest.mark.parametrize("bench,message", [
    (dict(ep=2), "parallel.ep_size=1"),
    (dict(routing_source="trace"), "routing_source=model"),
    (dict(routing_model="tiny"), "routing_model=same"),
])
def test_whatif_validation_config_errors(bench, message):
    from server.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _validation_settings(**bench)
