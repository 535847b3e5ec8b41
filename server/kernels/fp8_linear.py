"""Dense W8A8 block-FP8 linear with the activation quantisation fused into the GEMM.

FP8 block checkpoints (DeepSeek-V3/R1, Kimi-K2, Qwen3 -FP8) store every large linear, not only
the experts, as e4m3 codes with one fp32 scale per 128x128 block (weight_scale_inv). Loading
those dequantised to bf16 doubles their bytes, and in decode a step reads every weight once, so
the attention projections, MLA's LoRA projections, shared experts and dense first layers then
cost twice what the checkpoint's authors meant. This kernel reads the codes as stored.

    out [M, N] = x [M, K] @ W^T,  W [N, K] ~= codes [N, K] * scale[n // 128, k // 128]

Activations are quantised the way fp8_quant.py does for the expert GEMMs
(fp8_blocks.quantize_rows_reference is the torch twin of both) (per row, per
128-channel group: scale = max|x| / 448, codes rounded to nearest even), but inside the GEMM:
BLOCK_K is the whole 128-channel group, so each program loads its rows' group in the input dtype,
takes the group's max, scales and rounds in registers, and feeds e4m3 to the tensor cores:

    acc += tl.dot(q(x)[BM, 128], codes[128, BN]) * x_scale[:, None] * w_scale[None, :]

No quantised copy of x is written or read back, and there is one launch instead of two. The price
is that the N/BLOCK_N programs of a row block each quantise the same rows (a max and a divide per
element per program; the dot does BLOCK_N multiply-adds per element).

`fp8_linear_reference` is the fp32 twin (the same quantisation, dequantised operands, one fp32
matmul) the tests compare the kernel with; CPU runs of FP8 checkpoints never reach this module
(their weights are dequantised on load, server/model/fp8_reader.py).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton
    triton = None

from .fp8_blocks import GROUP, dequantize_blocks, dequantize_rows, quantize_rows_reference


if triton is not None:
    from .availability import interpreter_enabled
    from .triton_helpers import cast_e4m3_rtne, cast_rtne

    @triton.jit(do_not_specialize=["M"])
    def _fp8_linear_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K,
                           stride_xm, stride_wn, stride_sn, stride_om,
                           HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr, INTERP_BF16: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        cols_w = (cols % N).to(tl.int64)  # wrap instead of masking weight loads; stores are masked
        offs_k = tl.arange(0, GROUP_K)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]  # [BM, 128]
        w_ptrs = w_ptr + cols_w[None, :] * stride_wn + offs_k[:, None]  # [128, BN] e4m3
        s_ptrs = ws_ptr + (cols_w // GROUP_K) * stride_sn  # [BN] this column's weight-block row
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, GROUP_K)):
            k_ok = offs_k < K - kb * GROUP_K
            x = tl.load(x_ptrs, mask=(rows < M)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BM, 128]
            x_scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10) / 448.0  # [BM]
            xq = cast_e4m3_rtne(tl.minimum(tl.maximum(tl.math.div_rn(x, x_scale[:, None]), -448.0), 448.0),
                                INTERPRETED)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)  # [128, BN] e4m3
            acc += tl.dot(xq, w) * x_scale[:, None] * tl.load(s_ptrs + kb)[None, :]
            x_ptrs += GROUP_K
            w_ptrs += GROUP_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_w).to(tl.float32)[None, :]
        out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, cast_rtne(acc, out_ptr.dtype.element_ty, INTERP_BF16),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])


def fp8_linear_block_m(rows: int) -> int:
    """Row tile: decode batches are a few rows (16 is the smallest tensor-core tile), prefill
    chunks thousands (64 rows: the wgmma path; at 128 the in-register quantisation of a
    [128, 128] group beside a [128, 128] accumulator spills on sm_90)."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def fp8_linear_triton(x: torch.Tensor, codes: torch.Tensor, scale_inv: torch.Tensor,
                      bias: torch.Tensor | None = None, block_n: int = 128) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32), codes [N, K] float8_e4m3fn, scale_inv [ceil(N/128), ceil(K/128)]
    fp32, bias [N] or None -> [..., N] in x's dtype. One launch; no host sync."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = codes.shape[0]
    assert codes.shape[1] == k and codes.dtype == torch.float8_e4m3fn, (codes.shape, codes.dtype, k)
    assert tuple(scale_inv.shape) == (-(-n // GROUP), -(-k // GROUP)), (scale_inv.shape, n, k)
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*lead, n)
    codes = codes.contiguous()
    scale_inv = scale_inv.to(torch.float32).contiguous()
    block_m = fp8_linear_block_m(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_linear_kernel[grid](x2, codes, scale_inv, bias if bias is not None else scale_inv, out, m, n, k,
                             x2.stride(0), codes.stride(0), scale_inv.stride(0), out.stride(0),
                             HAS_BIAS=bias is not None, INTERPRETED=interpreter_enabled(),
                             INTERP_BF16=interpreter_enabled() and x.dtype == torch.bfloat16,
                             BLOCK_M=block_m, BLOCK_N=block_n, GROUP_K=GROUP, num_warps=4 if block_m <= 32 else 8,
                             num_stages=3)
    return out.view(*lead, n)


def fp8_linear_reference(x: torch.Tensor, codes: torch.Tensor, scale_inv: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's arithmetic in fp32: quantised activations and block-scaled weights, both
    dequantised, one matmul. x [..., K] -> [..., N] float32."""
    lead, k = x.shape[:-1], x.shape[-1]
    xd = dequantize_rows(*quantize_rows_reference(x.reshape(-1, k)))  # [M, K]
    out = xd @ dequantize_blocks(codes, scale_inv, (GROUP, GROUP)).T  # [M, N]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.view(*lead, codes.shape[0])
