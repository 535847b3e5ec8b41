"""The dense block-FP8 linear compiles for Hopper (sm_90) at DeepSeek-V3's projection shapes,
decode and prefill rows, with no register spills; prefill-sized row blocks take the FP8 wgmma
path (QGMMA in the SASS). No GPU needed (support/compile_check.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.support import compile_check  # noqa: E402


@pytest.mark.parametrize("m,n,k", [(8, 7168, 2048), (4096, 576, 7168), (4096, 24576, 1536)])
def test_fp8_linear_compiles_without_spills(m: int, n: int, k: int) -> None:
    from server.kernels.fp8_linear import fp8_linear_triton

    with compile_check.record_launches() as launches:
        fp8_linear_triton(torch.empty(m, k, device="meta", dtype=torch.bfloat16),
                          torch.empty(n, k, device="meta", dtype=torch.float8_e4m3fn),
                          torch.empty(-(-n // 128), -(-k // 128), device="meta"))
    (launch,) = launches
    c = compile_check.compile_launch(launch)
    assert c.spill_bytes == 0 and c.shared <= compile_check.SMEM_LIMIT, c
    if m >= 64:
        assert c.qgmma, f"{c.key} is not on the FP8 wgmma path"
