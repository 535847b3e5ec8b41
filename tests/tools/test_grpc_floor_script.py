"""scripts/bench_grpc_floor.py on CPU: the bare front end speaks GenerateStream well enough for
the real load tool's completeness checks (every stream gets exactly its tokens and a LENGTH
finish), counts every call's arrival, and with a step clock takes at least the steps' time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _floor(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "floor.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_grpc_floor.py"), "--streams", "12",
                           "--tokens", "9", "--prompt-tokens", "5", "--procs", "2", "--interval", "4", "--runs", "2",
                           "--json", str(out), *args], capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arrival span of 12 calls" in proc.stdout
    return json.loads(out.read_text())


def test_floor_counts_every_call_and_completes_every_stream(tmp_path) -> None:
    doc = _floor(tmp_path)
    assert len(doc["runs"]) == 2
    for run in doc["runs"]:
        assert run["calls"] == 12
        assert 0 <= run["arrival_span_s"] <= run["wall_s"]
        assert run["tok_s"] == 12 * 9 / run["wall_s"]


def test_a_step_clock_paces_the_streams(tmp_path) -> None:
    # 9 tokens at 4 per message: the first token at the next tick (anywhere within a step of the
    # call's arrival: the clock runs on its own), then 4 + 4 whole steps of 20 ms
    for run in _floor(tmp_path, "--step-ms", "20")["runs"]:
        assert run["wall_s"] >= 8 * 0.020
