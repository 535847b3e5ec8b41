"""The dense block-FP8 linear (server/kernels/fp8_linear.py: activations quantised inside the
GEMM) against its fp32 torch twin under TRITON_INTERPRET=1 on CPU, in one fresh subprocess
(support/interpret.py says why). Shapes cover partial 128-blocks in N and K, several row blocks,
one row, bias and bf16 output; the twin is the same quantised product, so fp32 outputs agree to
summation order. Scales read from the wrong block would not: a check with the scale grid
transposed must fail. Compiled for sm_90: test_fp8_linear_compile_sm90.py."""
from __future__ import annotations

import json

import pytest

from tests.kernels.support.interpret import run_source_in_interpreter

pytest.importorskip("triton")

CASES = [(5, 200, 300, "float32", True), (70, 130, 128, "float32", False), (33, 256, 256, "bfloat16", False),
         (1, 576, 384, "bfloat16", True)]  # (M, N, K, dtype, bias)
RUN = """
import json, torch
from server.kernels.fp8_linear import fp8_linear_reference, fp8_linear_triton
from tests.helpers.fp8_checkpoint import quantize_blocks
g = torch.Generator().manual_seed(0)
for m, n, k, dtype, bias in json.loads({cases!r}):
    dt = getattr(torch, dtype)
    codes, scales = quantize_blocks(torch.randn(n, k, generator=g) * torch.linspace(0.01, 1.0, k))
    x = (torch.randn(m, k, generator=g) * 3).to(dt)
    b = torch.randn(n, generator=g).to(dt) if bias else None
    out, ref = fp8_linear_triton(x, codes, scales, b), fp8_linear_reference(x, codes, scales, b)
    rel = lambda o, r: ((o.float() - r).norm() / r.norm()).item()
    wrong = fp8_linear_reference(x, codes, scales.flip(0).flip(1), b)  # every block's scale from elsewhere
    print(json.dumps({{"case": [m, n, k, dtype, bias], "shape": list(out.shape), "dtype": str(out.dtype),
                      "finite": bool(torch.isfinite(out).all()), "err": rel(out, ref), "wrong_scale_err": rel(wrong, ref)}}))
"""


@pytest.fixture(scope="module")
def results() -> list[dict]:
    out = run_source_in_interpreter(RUN.format(cases=json.dumps(CASES)), timeout_s=600)
    return [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]


def test_kernel_matches_its_twin(results) -> None:
    assert len(results) == len(CASES)
    for r in results:
        m, n, _, dtype, _ = r["case"]
        assert r["shape"] == [m, n] and r["dtype"] == f"torch.{dtype}" and r["finite"], r
        assert r["err"] < (1e-5 if dtype == "float32" else 8e-3), r  # bf16: the output's own rounding


def test_a_wrong_scale_block_would_fail(results) -> None:
    assert all(r["wrong_scale_err"] > 0.1 for r in results if r["case"][1] > 128 or r["case"][2] > 128), results
