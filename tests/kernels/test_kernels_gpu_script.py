"""scripts/gpu_kernels_check.py and scripts/tune_moe.py run end to end (CPU interpreter, tiny shapes).

The lead runs both on an H100 with minutes of device time; this catches script bugs first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")


def run_script(args: list[str], out_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out_dir), CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_gpu_kernels_check_smoke(tmp_path: Path) -> None:
    proc = run_script(["scripts/gpu_kernels_check.py", "--smoke-cpu"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_kernels_check.json").read_text())
    assert not result["errors"]
    sections = {r["section"] for r in result["rows"]}
    assert {"moe", "moe-parts", "ep4", "decode", "prefill"} <= sections
    assert all(r["ok"] for r in result["rows"] if r["ok"] is not None)
    assert "failed checks" in proc.stdout.splitlines()[-1]


def test_tune_moe_smoke(tmp_path: Path) -> None:
    proc = run_script(["scripts/tune_moe.py", "--smoke-cpu"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "cpu_smoke_E4_H64_I32.json").read_text())
    assert data["meta"]["top_k"] == 2 and set(data) == {"meta", "3", "40"}
    from server.moe.kernels.moe_config import MoEConfig

    for key in ("3", "40"):
        MoEConfig.from_json(data[key])  # loadable by the runtime
    assert not list((ROOT / "server/moe/kernels/configs").glob("cpu_smoke*"))  # smoke never writes the repo
