"""The one-program capacity kernel compiles for Hopper (sm_90) at serving shapes, within shared
memory: Qwen3-30B-A3B (E=128) at EP8 and EP32 bins, DeepSeek-V3 (E=256) per expert, decode
batches. No GPU needed (support/compile_check.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.support import compile_check  # noqa: E402


@pytest.mark.parametrize("n,experts,width,exact", [(128, 128, 16, True), (256, 256, 1, True), (512, 128, 4, False)])
def test_capacity_kernel_compiles(n: int, experts: int, width: int, exact: bool) -> None:
    from server.moe.kernels.capacity_route import capacitated_topk_fused

    with compile_check.record_launches() as launches:
        capacitated_topk_fused(torch.empty(8, n, experts, device="meta"), 8, width, exact, n, 20, 0.85)
    assert len(launches) == 1
    compiled = compile_check.compile_launch(launches[0])
    assert compiled.name == "_capacity_kernel" and compiled.shared <= compile_check.SMEM_LIMIT, compiled
    assert compiled.spill_bytes <= 1024, compiled  # a few spilled registers at the widest tiles, no more
