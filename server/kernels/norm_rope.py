"""RMSNorm and rotary embedding as single Triton passes, with their torch twins.

In plain torch, transformers' RMSNorm is ~6 elementwise passes in float32 and RoPE ~5 passes
(cat, negate, two products, a sum). On a prefill of 8192 tokens at Qwen3-30B-A3B widths the
per-head q norm alone moves ~0.8 GB that way; one pass reads x once and writes y once.
Semantics match the twins: RMSNorm normalises in float32, casts to the input dtype, then
multiplies by the weight (transformers' order); RoPE computes x*cos + rotate_half(x)*sin in
float32 and rounds once (the torch twin rounds after each bf16 op, so bf16 results may differ
by an ulp; float32 results agree to rounding).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the twins
    triton = None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D] (transformers' RMSNorm)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, D] -> [T, heads, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


if triton is not None:

    @triton.jit(do_not_specialize=["rows"])  # rows change every step: one compile for all
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, rows, stride_x, stride_o, eps,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        mask = (r < rows)[:, None] & (d < D)[None, :]
        x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_x + d[None, :], mask=mask, other=0.0)
        h = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / D + eps)  # [BLOCK_R]
        y = (h * rstd[:, None]).to(x.dtype)  # cast before the weight, as transformers does
        w = tl.load(w_ptr + d, mask=d < D, other=0.0)
        out = (w[None, :].to(tl.float32) * y.to(tl.float32)).to(x.dtype)
        tl.store(out_ptr + r[:, None].to(tl.int64) * stride_o + d[None, :], out, mask=mask)

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xt, stride_xh, stride_c,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        j = tl.arange(0, HALF)  # [HALF]
        mask = (h < heads)[:, None]
        base = x_ptr + t.to(tl.int64) * stride_xt + h[:, None] * stride_xh + j[None, :]
        lo = tl.load(base, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, HALF] first half
        hi = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)  # second half
        c_lo = tl.load(cos_ptr + t * stride_c + j).to(tl.float32)[None, :]
        c_hi = tl.load(cos_ptr + t * stride_c + HALF + j).to(tl.float32)[None, :]
        s_lo = tl.load(sin_ptr + t * stride_c + j).to(tl.float32)[None, :]
        s_hi = tl.load(sin_ptr + t * stride_c + HALF + j).to(tl.float32)[None, :]
        out = out_ptr + t.to(tl.int64) * stride_xt + h[:, None] * stride_xh + j[None, :]
        tl.store(out, (lo * c_lo - hi * s_lo).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out + HALF, (hi * c_hi + lo * s_hi).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as rms_norm_reference; x's last dim must be contiguous."""
    shape, d = x.shape, x.shape[-1]
    x2 = x.reshape(-1, d)  # [R, D]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows:
        block_d = triton.next_power_of_2(d)
        block_r = max(1, min(16, 4096 // block_d))
        _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
            x2, weight, out, rows, x2.stride(0), out.stride(0), eps,
            D=d, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=4 if block_d >= 1024 else 2)
    return out.view(shape)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Same contract as rope_reference (head_dims that are not a power of two use the twin)."""
    t, heads, d = x.shape
    if d < 2 or d & (d - 1):
        return rope_reference(x, cos, sin)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    if t:
        block_h = min(triton.next_power_of_2(heads), 16)
        _rope_kernel[(t, triton.cdiv(heads, block_h))](
            x, cos, sin, out, heads, x.stride(0), x.stride(1), cos.stride(0),
            HALF=d // 2, BLOCK_H=block_h, num_warps=1 if heads * d <= 1024 else 4)
    return out
