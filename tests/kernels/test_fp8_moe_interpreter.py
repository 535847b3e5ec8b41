"""Block-FP8 MoE kernels on CPU through Triton's interpreter, against their fp32 twin.

Shapes are drawn at random (fixed seed) with N and K off the 128 grid, so partial scale
blocks, gate/up splits inside a block and several K blocks all occur; routing leaves experts
with no rows. All cases run in one interpreter subprocess (one import of torch and triton).
"""
from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.support.interpret import run_source_in_interpreter  # noqa: E402


def random_cases(seed: int, n: int) -> list:
    rng = random.Random(seed)
    cases = [["quantize", {"rows": 37, "k": 300, "dtype": "float32"}],
             ["quantize", {"rows": 21, "k": 130, "dtype": "bfloat16", "valid": 5}]]
    for i in range(n):
        shape = {"hidden": rng.randrange(130, 300), "inter": rng.randrange(40, 200), "block_m": rng.choice([16, 32]),
                 "block_n": rng.choice([16, 32, 64]), "block_k": rng.choice([32, 64, 128]), "seed": i,
                 "dtype": "bfloat16" if i % 3 == 2 else "float32"}
        experts = rng.randrange(3, 7)
        kind = ("fused_moe_fp8", "grouped_fp8", "expert_rows_fp8")[i % 3]
        if kind == "fused_moe_fp8":
            shape.update(num_tokens=rng.randrange(1, 12), top_k=rng.randrange(1, 4), num_experts=experts + 2)
        elif kind == "grouped_fp8":
            shape.update(counts=[rng.choice([0, rng.randrange(1, 40)]) for _ in range(experts)] + [0])
        else:
            shape.update(num_rows=rng.randrange(1, 40), num_experts=experts + 2)
        cases.append([kind, shape])
    return cases


def test_fp8_kernels_match_twin_on_random_shapes() -> None:
    cases = random_cases(seed=2026, n=6)
    src = ("import json\nfrom tests.kernels.support.fp8_checks import run_cases\n"
           f"print(json.dumps(run_cases(json.loads({json.dumps(json.dumps(cases))}))))")
    results = json.loads(run_source_in_interpreter(src, timeout_s=240).strip().splitlines()[-1])
    assert len(results) == len(cases)
    assert any(c[1].get("hidden", 0) > 256 or c[1].get("inter", 0) > 128 for c in cases)  # several K blocks somewhere
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad


def test_fp8_config_rejects_block_k_across_scale_blocks() -> None:
    from server.moe.kernels.fp8_config import check_fp8_config, default_fp8_config
    from server.moe.kernels.moe_config import GemmConfig, MoEConfig

    for rows in (1, 300, 5000, 100000):
        cfg = check_fp8_config(default_fp8_config(rows, 128))
        assert cfg.gate_up.BLOCK_K == cfg.down.BLOCK_K == 128
    g = GemmConfig(BLOCK_N=64, BLOCK_K=256)
    with pytest.raises(ValueError, match="BLOCK_K=256 must divide"):
        check_fp8_config(MoEConfig(16, GemmConfig(BLOCK_N=64, BLOCK_K=64), g))


def test_fp8_pipeline_rejects_wrong_scales() -> None:
    from server.moe.kernels.fused_moe_fp8 import check_fp8_experts

    x = torch.empty(2, 200)
    w13 = torch.empty(3, 2 * 72, 200, dtype=torch.float8_e4m3fn)
    w2 = torch.empty(3, 200, 72, dtype=torch.float8_e4m3fn)
    good = torch.empty(3, 2, 2), torch.empty(3, 2, 1)
    assert check_fp8_experts(x, w13, good[0], w2, good[1]) == (3, 72)
    with pytest.raises(ValueError, match=r"w2 scales must be \(3, 2, 1\)"):
        check_fp8_experts(x, w13, good[0], w2, torch.empty(3, 4, 2))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        check_fp8_experts(x, w13.float(), good[0], w2, good[1])
