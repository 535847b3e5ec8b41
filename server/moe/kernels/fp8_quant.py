"""Dynamic activation quantisation for the block-FP8 MoE GEMMs: per row, per 128-channel group.

FP8 block checkpoints (DeepSeek-V3 style, activation_scheme "dynamic") expect each token's
activations cut into groups of 128 channels, every group scaled so its largest magnitude maps
to e4m3's 448 and rounded to e4m3. The GEMM then multiplies e4m3 codes on the tensor cores and
applies (row scale x weight block scale) per 128-wide K block. The group must equal the
weight's K block (128) for that factorisation to hold, hence GROUP = 128 here, not a tile.

    x [M, K] (bf16 / fp16 / fp32, rows strided) -> q [M, K] float8_e4m3fn, s [M, ceil(K/128)] fp32
    x[m, k] ~= q[m, k] * s[m, k // 128]

Rows past *num_valid (when given) are not touched: the down GEMM's activation buffer has an
upper-bound size and only its first num_padded rows are live; the count stays on the device.
The torch twin rounds the same way (the scale is amax / 448, the division is IEEE in both),
so on CPU the codes match bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels.availability import interpreter_enabled
# the torch twin and the constants live with the rest of the block-FP8 arithmetic (re-exported here)
from ...kernels.fp8_blocks import E4M3_MAX, GROUP, MIN_AMAX, dequantize_rows, quantize_rows_reference  # noqa: F401
from ...kernels.triton_helpers import cast_e4m3_rtne
from ...kernels.workspace import workspace

ROWS_PER_PROGRAM = 16


@triton.jit(do_not_specialize=["num_rows"])
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, num_valid_ptr, num_rows, K,
                          stride_xm, stride_qm, stride_sm,
                          HAS_VALID: tl.constexpr, INTERPRETED: tl.constexpr,
                          ROWS: tl.constexpr, GROUP: tl.constexpr):
    row0 = tl.program_id(0) * ROWS
    limit = num_rows
    if HAS_VALID:
        limit = tl.minimum(limit, tl.load(num_valid_ptr))
    if row0 >= limit:
        return
    rows = (row0 + tl.arange(0, ROWS)).to(tl.int64)  # [R]
    cols = tl.program_id(1) * GROUP + tl.arange(0, GROUP)  # [G]
    ok = (rows < limit)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)  # [R, G]
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10)  # [R]
    scale = amax / 448.0
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], cast_e4m3_rtne(y, INTERPRETED), mask=ok)
    tl.store(s_ptr + rows * stride_sm + tl.program_id(1), scale, mask=rows < limit)


def quantize_rows_fp8(x: torch.Tensor, num_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8_e4m3fn, s [M, ceil(K/128)] fp32); rows >= num_valid[0] (a
    device int32 [1], optional) are left unwritten. One launch, no host sync."""
    num_rows, k = x.shape
    assert x.stride(1) == 1
    q = workspace((num_rows, k), torch.float8_e4m3fn, x.device)
    s = workspace((num_rows, triton.cdiv(k, GROUP)), torch.float32, x.device)
    if num_rows == 0 or k == 0:
        return q, s
    grid = (triton.cdiv(num_rows, ROWS_PER_PROGRAM), triton.cdiv(k, GROUP))
    _quantize_rows_kernel[grid](
        x, q, s, x if num_valid is None else num_valid, num_rows, k, x.stride(0), q.stride(0), s.stride(0),
        HAS_VALID=num_valid is not None, INTERPRETED=interpreter_enabled(), ROWS=ROWS_PER_PROGRAM, GROUP=GROUP)
    return q, s
