"""scripts/bench_mla_prefill.py runs end to end on CPU (Triton's interpreter, tiny shapes), so a
bug in the script shows up before GPU time is spent on it: both prefill forms, whole and kernel
only, the tile sweep, the crossover and the stored config it writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kernels.support.interpret import run_source_in_interpreter

pytest.importorskip("triton")

RUN_SCRIPT = """
import runpy, sys
sys.argv = ["scripts/bench_mla_prefill.py", "--smoke-cpu", "--out", {out!r}, "--write-config", "--config-dir", {cfg!r}]
try:
    runpy.run_path("scripts/bench_mla_prefill.py", run_name="__main__")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
"""


def test_bench_mla_prefill_smoke(tmp_path: Path) -> None:
    out = run_source_in_interpreter(RUN_SCRIPT.format(out=str(tmp_path / "p.json"), cfg=str(tmp_path)), timeout_s=300)
    assert out.strip().splitlines()[-1] == "3 cases; 0 failed checks"
    result = json.loads((tmp_path / "p.json").read_text())
    assert [(r["batch"], r["length"]) for r in result["rows"]] == [(1, 24), (1, 40), (2, 33)]
    for row in result["rows"]:
        for path in ("absorbed", "absorbed_kernel", "expanded", "expanded_kernel"):
            assert row.get(f"{path}_rel_err", 0.0) < 1e-5 and row[f"{path}_us"] > 0, (path, row)
        assert row["expanded_swept_tiles"]["BLOCK_M"] == 16
    (first,) = [r for r in result["rows"] if r["length"] == 24]
    # causal pairs 24 * 25 / 2 = 300, 2 heads, (nope 16 + rope 16 + v 16); decompression 2 * 24 * 32 * 2 * 32
    assert first["expanded_kernel_flops"] == 2 * 2 * 48 * 300
    assert first["expanded_flops"] == 2 * 2 * 48 * 300 + 2 * 24 * 32 * 2 * 32
    assert "crossover_len" in result and result["threshold_now"] > 0
    (stored,) = tmp_path.glob("cpu_MLA_PREFILL_H2_QK32_V16.json")
    assert json.loads(stored.read_text())["config"]["BLOCK_M"] == 16


def test_crossover_interpolates_in_log_length() -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts/bench_mla_prefill.py"
    spec = importlib.util.spec_from_file_location("bench", script)
    # importing the script needs triton only for do_bench; the crossover is plain arithmetic
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"batch": 1, "length": n, "absorbed_us": 100.0, "expanded_us": e} for n, e in ((256, 200.0), (1024, 50.0))]
    assert bench.crossover_len(rows) == pytest.approx(512.0)
    assert bench.crossover_len([dict(rows[1])]) == 1024.0
    assert bench.crossover_len([dict(rows[0])]) is None
