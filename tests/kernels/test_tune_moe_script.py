"""scripts/tune_moe.py runs end to end on CPU (Triton's interpreter, tiny shapes), so a bug in
the script shows up before GPU time is spent on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.kernels.support.interpret import run_source_in_interpreter

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")

RUN_SCRIPT = """
import runpy, sys
sys.argv = ["scripts/tune_moe.py", "--smoke-cpu"]
try:
    runpy.run_path("scripts/tune_moe.py", run_name="__main__")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
"""


def test_tune_moe_smoke(tmp_path: Path) -> None:
    out = run_source_in_interpreter(RUN_SCRIPT, timeout_s=300, env={"OUT": str(tmp_path)})
    assert "# wrote" in out.strip().splitlines()[-1]
    data = json.loads((tmp_path / "cpu_smoke_E4_H64_I32.json").read_text())
    assert data["meta"]["top_k"] == 2 and set(data) == {"meta", "3", "40"}
    from server.moe.kernels.moe_config import MoEConfig

    import torch

    from server.moe.kernels.moe_config import default_config

    for key in ("3", "40"):
        stored = MoEConfig.from_json(data[key])  # loadable by the runtime
        timing = data["meta"]["timings_us"][key]
        if timing["tuned"] >= timing["default"]:  # not measured faster: the bucket holds the default
            assert timing["kept"] == "default" and stored == default_config(int(key) * 2, 4, torch.bfloat16)
        assert timing["kept"] in ("tuned", "default")
    assert not list((ROOT / "server/moe/kernels/configs").glob("cpu_smoke*"))  # smoke never writes the repo


def test_tune_moe_fp8_smoke(tmp_path: Path) -> None:
    """The FP8 tuner writes a *_fp8.json the FP8 config lookup accepts (every BLOCK_K divides 128)."""
    out = run_source_in_interpreter(RUN_SCRIPT.replace("tune_moe.py", "tune_moe_fp8.py"), timeout_s=300,
                                    env={"OUT": str(tmp_path)})
    assert "# wrote" in out.strip().splitlines()[-1]
    data = json.loads((tmp_path / "cpu_smoke_E4_H64_I32_fp8.json").read_text())
    assert set(data) == {"meta", "3", "40"} and data["meta"]["tool"] == "scripts/tune_moe_fp8.py"
    from server.moe.kernels.fp8_config import check_fp8_config, default_fp8_config
    from server.moe.kernels.moe_config import MoEConfig

    for key in ("3", "40"):
        stored = check_fp8_config(MoEConfig.from_json(data[key]))
        if data["meta"]["timings_us"][key]["kept"] == "default":
            assert stored == default_fp8_config(int(key) * 2, 4)
    assert not list((ROOT / "server/moe/kernels/configs").glob("cpu_smoke*"))
