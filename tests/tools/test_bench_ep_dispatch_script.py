"""scripts/bench_ep_dispatch.py runs end to end on CPU (gloo, the tiny model, no graphs), every
path (the fp8 wire too) and the EP-size sweep included, so a bug in the script shows up before
GPU time is spent."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_bench_ep_dispatch_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "dispatch.json"
    cmd = [sys.executable, "scripts/bench_ep_dispatch.py", "--device", "cpu", "--model", "tiny", "--ep", "1", "2",
           "--batch", "4", "--steps", "1", "--repeats", "2", "--prefill-tokens", "16", "--input-len", "8",
           "--fp8-wire", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Decode tok/s by EP size" in proc.stdout
    docs = json.loads(out.read_text())
    assert set(docs) == {"1", "2"}
    assert set(docs["1"]["decode"]["4"]) == {"local", "allgather", "allgather_fp8", "alltoall"}
    assert set(docs["2"]["decode"]["4"]) == {"1gpu", "allgather", "allgather_fp8", "alltoall"}
    assert "all-gather bytes per token row: bf16 528 B, fp8 160 B" in proc.stdout  # tiny: H=128, fp32, top-2
    for doc in docs.values():
        for row in doc["decode"]["4"].values():
            assert row["tok_s"] > 0 and len(row["repeats_s"]) == 2 and row["graphs"] is False
        assert set(doc["prefill"]) == {"allgather", "allgather_fp8", "alltoall"}
        assert doc["wire_bytes"] == {"bf16": 528, "fp8": 160}
        assert doc["decode"]["4"]["allgather_fp8"]["time_vs_allgather"] > 0
        assert doc["prefill"]["allgather_fp8"]["time_vs_allgather"] > 0


def test_bench_ep_dispatch_refuses_a_batch_that_does_not_split() -> None:
    proc = subprocess.run([sys.executable, "scripts/bench_ep_dispatch.py", "--device", "cpu", "--ep", "3",
                           "--batch", "8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not split over --ep 3" in proc.stderr
