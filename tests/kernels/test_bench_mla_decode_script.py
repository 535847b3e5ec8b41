"""scripts/bench_mla_decode.py runs end to end on CPU (Triton's interpreter, tiny shapes), so a bug
in the script shows up before GPU time is spent on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kernels.support.interpret import run_source_in_interpreter

pytest.importorskip("triton")

RUN_SCRIPT = """
import runpy, sys
sys.argv = ["scripts/bench_mla_decode.py", "--smoke-cpu", "--out", {out!r}]
try:
    runpy.run_path("scripts/bench_mla_decode.py", run_name="__main__")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
"""


def test_bench_mla_decode_smoke(tmp_path: Path) -> None:
    out = run_source_in_interpreter(RUN_SCRIPT.format(out=str(tmp_path / "mla.json")), timeout_s=300)
    assert out.strip().splitlines()[-1].endswith("; 0 failed checks")
    (row,) = json.loads((tmp_path / "mla.json").read_text())["rows"]
    assert row["triton_rel_err"] < 1e-5 and row["dense_rel_err"] < 1e-5 and row["triton_us"] > 0
    assert row["swept_best_tiles"] == {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    assert row["bytes"] == 3 * 40 * 48 * 2 + 3 * 4 * (48 + 32) * 2  # latent rows once, q in, output out
