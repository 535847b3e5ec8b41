"""scripts/calibrate_interconnect.py: the fit recovers a known alpha-beta line, a run over CPU
processes (gloo) writes a profile the what-if loads, and with fewer than two GPUs it says
there is nothing to measure."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "calibrate_interconnect.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_fit_recovers_latency_and_bus_bandwidth():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from calibrate_interconnect import fit
    finally:
        sys.path.pop(0)
    sizes = [4096 << i for i in range(16)]
    assert fit(sizes, [12e-6 + 7 / 8 * s / 370e9 for s in sizes], 8) == {"latency_us": 12.0, "bus_bw_gbps": 370.0}
    across = [30e-6 + 24 / 32 * s / 48e9 for s in sizes]
    assert fit(sizes, across, 32, share=24 / 32) == {"latency_us": 30.0, "bus_bw_gbps": 48.0}


def test_gloo_run_writes_a_profile_the_whatif_loads(tmp_path):
    from server.bench.whatif.wire import load_interconnect

    out = tmp_path / "cpu.yaml"
    res = _run("--out", str(out), "--backend", "gloo", "--device", "cpu", "--gpus", "2", "--max-mb", "1", "--reps", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    profile = load_interconnect(str(out))
    assert profile.gpus_per_node == 2 and profile.inter is None
    assert set(profile.intra) == {"all_gather", "all_to_all"}
    assert "Measured by scripts/calibrate_interconnect.py" in out.read_text()
    assert profile.seconds("all_to_all", 2, 1 << 20) > 0


def test_one_gpu_has_nothing_to_measure(tmp_path):
    res = _run("--out", str(tmp_path / "x.yaml"))
    assert res.returncode == 0 and "nothing to measure" in res.stdout
    assert not (tmp_path / "x.yaml").exists()
