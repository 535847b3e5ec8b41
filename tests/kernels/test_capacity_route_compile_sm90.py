"""The fused capacity solver's kernels compile for Hopper (sm_90) at serving shapes, within
shared memory and with few spilled registers: Qwen3-30B-A3B (E=128) at EP8 and EP32 bins,
DeepSeek-V3 (E=256) per expert, decode batches and an 8192-token prefill call, whose bins'
thresholds are bisected in chunks. No GPU needed (support/compile_check.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.support import compile_check  # noqa: E402

CHAIN = ["tau_kernel", "price_kernel", "assign_kernel", "caps_kernel", "candidates_kernel", "moves_kernel", "order_kernel"]


@pytest.mark.parametrize("n,experts,width,exact", [(128, 128, 16, True), (256, 256, 1, True), (512, 128, 4, False),
                                                   (8192, 128, 16, True)])
def test_capacity_kernels_compile(n: int, experts: int, width: int, exact: bool) -> None:
    from server.moe.kernels.capacity_route import capacitated_topk_fused

    steps = 3
    with compile_check.record_launches() as launches:
        capacitated_topk_fused(torch.empty(8, n, experts, device="meta"), 8, width, exact, n, steps, 0.85)
    names = [launch.kernel.fn.__name__ for launch in launches]
    assert names == CHAIN[:2] * steps + CHAIN[2:], names  # a fixed chain: 2 launches per price step, then 5
    for launch in launches[2 * steps - 2:]:  # one of each kernel
        compiled = compile_check.compile_launch(launch)
        assert compiled.shared <= compile_check.SMEM_LIMIT, compiled
        assert compiled.spill_bytes <= 1024, compiled  # a few spilled registers at the widest tiles, no more
