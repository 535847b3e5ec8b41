"""The block-FP8 MoE pipeline compiles for Hopper (sm_90) at its default configs, without spills.

No GPU needed (tests/kernels/support/compile_check.py): launches are recorded on meta tensors
at Qwen3-30B-A3B's expert shapes (E=128, H=2048, I=768, top-8) and compiled for sm_90. At
prefill sizes the GEMMs must multiply e4m3 on wgmma (SASS QGMMA); decode-size tiles (BLOCK_M
16, below wgmma's 64 rows) take mma.sync, which is fine where the weights' bytes set the time.
"""
from __future__ import annotations

import pytest

pytest.importorskip("triton")

from tests.kernels.support import compile_check  # noqa: E402

GEMMS = ("_gate_up_silu_fp8_kernel", "_down_scatter_fp8_kernel")


def compiled(tokens: int, names=None) -> list:
    from server.moe.kernels.fused_moe_fp8 import fused_moe_fp8_triton

    with compile_check.record_launches() as launches:
        fused_moe_fp8_triton(*compile_check.meta_fp8_moe(tokens))
    seen = {}
    for launch in launches:
        if names is None or launch.kernel.fn.__name__ in names:
            c = compile_check.compile_launch(launch)
            seen[(c.name, c.key)] = c
    return list(seen.values())


def test_decode_size_fp8_pipeline_compiles() -> None:
    kernels = compiled(1)
    assert {"_quantize_rows_kernel", *GEMMS, "_combine_slots_kernel"} <= {c.name for c in kernels}
    for c in kernels:
        assert c.spill_bytes == 0 and c.shared <= compile_check.SMEM_LIMIT, c


@pytest.mark.parametrize("tokens", [512, 2048, 8192])
def test_larger_fp8_gemms_compile_without_spills(tokens: int) -> None:
    kernels = compiled(tokens, GEMMS)
    assert {c.name for c in kernels} == set(GEMMS)
    for c in kernels:
        assert c.spill_bytes == 0 and c.shared <= compile_check.SMEM_LIMIT, c
        if tokens == 8192:
            assert c.qgmma, f"{c.name} {c.key} does not multiply e4m3 on wgmma"
