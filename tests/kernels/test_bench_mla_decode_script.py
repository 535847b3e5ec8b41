"""scripts/bench_mla_decode.py runs end to end on CPU (Triton's interpreter, tiny shapes), so a bug
in the script shows up before GPU time is spent on it: all three decode paths, both sweeps and
the stored config it writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kernels.support.interpret import run_source_in_interpreter

pytest.importorskip("triton")

RUN_SCRIPT = """
import runpy, sys
sys.argv = ["scripts/bench_mla_decode.py", "--smoke-cpu", "--out", {out!r}, "--write-config", "--config-dir", {cfg!r}]
try:
    runpy.run_path("scripts/bench_mla_decode.py", run_name="__main__")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
"""


def test_bench_mla_decode_smoke(tmp_path: Path) -> None:
    from server.kernels.mla_decode_config import MLADecodeConfig, load_table

    out = run_source_in_interpreter(RUN_SCRIPT.format(out=str(tmp_path / "mla.json"), cfg=str(tmp_path)), timeout_s=300)
    assert out.strip().splitlines()[-1].endswith("; 0 failed checks")
    (row,) = json.loads((tmp_path / "mla.json").read_text())["rows"]
    for path in ("triton_decode", "triton", "dense"):
        assert row[f"{path}_rel_err"] < 1e-5 and row[f"{path}_us"] > 0, path
    assert row["triton_swept_tiles"] == {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    assert row["triton_decode_swept_tiles"]["BLOCK_H"] == 16 and row["triton_decode_swept_tiles"]["num_splits"] == 0
    assert row["triton_decode_splits"]["heuristic"] == row["triton_decode_num_splits"] == 1
    assert row["bytes"] == 3 * 40 * 48 * 2 + 3 * 4 * (48 + 32) * 2  # latent rows once, q in, output out
    (stored,) = tmp_path.glob("cpu_MLA_H4_D32_R16_P8.json")
    table = load_table(str(stored))
    assert list(table) == [3] and isinstance(table[3], MLADecodeConfig) and table[3].BLOCK_N in (16, 32)
