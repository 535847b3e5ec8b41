"""MLA prefill in both forms on a small random DeepSeek-V3 (latent 32 + rope 16, 4 heads), Triton
path under the interpreter on CPU, against the torch path's absorbed loop: whole prompts, a chunk
over a cached prefix beside a decoding sequence, then decode. kernels.mla_prefill=absorbed runs
the latent-cache kernel only, =expanded the decompressed flash-attention kernel on every prefill
step, =auto on the step whose queries per key reach the threshold (set between the two steps').
Logits within 1e-3 and the same greedy tokens. Real widths: tests/model/test_deepseek_gpu.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_absorbed_expanded_and_auto_prefill_match_the_torch_path() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.mla_prefill_worker", "{}"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"], result
