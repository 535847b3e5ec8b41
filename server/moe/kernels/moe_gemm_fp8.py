"""Grouped W8A8 block-FP8 GEMMs over aligned rows: the FP8 twins of moe_gemm.py's two GEMMs.

Operands are e4m3 codes with fp32 scales: weights [E, N, K] with one scale per 128x128 block
([E, ceil(N/128), ceil(K/128)], the checkpoint's weight_scale_inv), activations [M, K] with one
scale per row and 128-channel group ([M, ceil(K/128)], fp8_quant.py). Per K block the tensor
cores multiply codes into fp32 and the block's scales are applied to that partial sum:

    acc += tl.dot(a_fp8, b_fp8) * a_scale[:, None] * b_scale[None, :]

That is exact algebra only while one K step stays inside one scale block, so BLOCK_K must
divide 128 (128, 64, 32, 16); fp8_config.py enforces it. Any BLOCK_N works: each output
column looks up its own weight-block row (n // 128), so partial blocks (N, K not multiples
of 128) and a gate/up split that falls inside a block (I % 128 != 0) need no special case.

gate_up_silu_fp8: act[p] = silu(x[row(p)] @ gate_e^T) * (x[row(p)] @ up_e^T)   act [max_padded, I]
down_scatter_fp8: out[id(p)] = w[id(p)] * act[p] @ w2_e^T                      out [rows, H]
Same alignment, sorted-position layout, padding rule, grouped tile order and count
de-specialisation as the bf16 kernels (moe_gemm.py), so the same pipelines wrap them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels.availability import dot_mode
from ...kernels.triton_helpers import cast_rtne
from .fp8_quant import GROUP
from .moe_align import Alignment
from .moe_config import GemmConfig
from .moe_gemm import ROW_COUNTS, _tile_ids


@triton.jit(do_not_specialize=ROW_COUNTS)
def _gate_up_silu_fp8_kernel(
    xq_ptr, xs_ptr, w13_ptr, ws_ptr, act_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_rows, max_blocks, I, H,
    stride_xm, stride_xsm, stride_we, stride_wn, stride_se, stride_sn, stride_am,
    ROW_DIV: tl.constexpr, EVEN_K: tl.constexpr, INTERP_BF16: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), max_blocks, tl.cdiv(I, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] sorted positions
    ids = tl.load(sorted_ptr + offs_p)
    rows = tl.where(ids < num_rows, ids // ROW_DIV, 0).to(tl.int64)  # [BM] rows of x
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nw = (offs_n % I).to(tl.int64)  # wrap instead of masking weight loads; stores are masked
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = xq_ptr + rows[:, None] * stride_xm + offs_k[None, :]  # [BM, BK] e4m3
    g_ptrs = w13_ptr + expert * stride_we + offs_nw[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] e4m3
    u_ptrs = g_ptrs + I * stride_wn
    as_ptrs = xs_ptr + rows * stride_xsm  # [BM] scales of K group 0
    gs_ptrs = ws_ptr + expert * stride_se + (offs_nw // SCALE_BLOCK) * stride_sn  # [BN] gate block rows
    us_ptrs = ws_ptr + expert * stride_se + ((offs_nw + I) // SCALE_BLOCK) * stride_sn  # [BN] up block rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < H - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        kb = k0 // SCALE_BLOCK  # BLOCK_K divides SCALE_BLOCK: the whole step is in this block
        a_s = tl.load(as_ptrs + kb)  # [BM]
        acc_g += tl.dot(a, g) * a_s[:, None] * tl.load(gs_ptrs + kb)[None, :]
        acc_u += tl.dot(a, u) * a_s[:, None] * tl.load(us_ptrs + kb)[None, :]
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    act = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, fp32
    out_ptrs = act_ptr + offs_p[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    tl.store(out_ptrs, cast_rtne(act, act_ptr.dtype.element_ty, INTERP_BF16), mask=(offs_n < I)[None, :])


@triton.jit(do_not_specialize=ROW_COUNTS)
def _down_scatter_fp8_kernel(
    aq_ptr, as_ptr, w2_ptr, ws_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_rows, max_blocks, H, I,
    stride_am, stride_asm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
    MUL_WEIGHT: tl.constexpr, EVEN_K: tl.constexpr, INTERP_BF16: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), max_blocks, tl.cdiv(H, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ptr + offs_p)
    row_ok = ids < num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_nw = (offs_n % H).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = aq_ptr + offs_p[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BM, BK] e4m3
    b_ptrs = w2_ptr + expert * stride_we + offs_nw[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] e4m3
    as_ptrs = as_ptr + offs_p.to(tl.int64) * stride_asm  # [BM]
    bs_ptrs = ws_ptr + expert * stride_se + (offs_nw // SCALE_BLOCK) * stride_sn  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < I - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        kb = k0 // SCALE_BLOCK
        acc += tl.dot(a, b) * tl.load(as_ptrs + kb)[:, None] * tl.load(bs_ptrs + kb)[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + ids, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, cast_rtne(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None] & (offs_n < H)[None, :])


def _check_block_k(cfg: GemmConfig) -> None:
    if GROUP % cfg.BLOCK_K:
        raise ValueError(f"FP8 GEMM BLOCK_K must divide the {GROUP}-wide scale block, got {cfg.BLOCK_K}")


def gate_up_silu_fp8(xq: torch.Tensor, xs: torch.Tensor, w13: torch.Tensor, w13_s: torch.Tensor, al: Alignment,
                     cfg: GemmConfig, row_div: int, act: torch.Tensor) -> torch.Tensor:
    """xq [*, H] e4m3 + xs [*, ceil(H/128)] (rows via al.sorted_ids // row_div), w13 [E, 2I, H] e4m3
    + w13_s [E, ceil(2I/128), ceil(H/128)] -> act [max_padded, I] (act's dtype, e.g. bf16)."""
    _check_block_k(cfg)
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    if act.shape[0] == 0:
        return act
    assert xq.stride(1) == 1 and w13.stride(2) == 1 and act.stride(1) == 1 and xs.stride(1) == 1 and w13_s.stride(2) == 1
    grid = (al.max_blocks * triton.cdiv(inter, cfg.BLOCK_N),)
    _gate_up_silu_fp8_kernel[grid](
        xq, xs, w13, w13_s, act, al.sorted_ids, al.block_expert, al.num_padded,
        al.num_rows, al.max_blocks, inter, hidden,
        xq.stride(0), xs.stride(0), w13.stride(0), w13.stride(1), w13_s.stride(0), w13_s.stride(1), act.stride(0),
        ROW_DIV=row_div, EVEN_K=hidden % cfg.BLOCK_K == 0, INTERP_BF16=dot_mode(act.dtype)[1], SCALE_BLOCK=GROUP,
        BLOCK_M=al.block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return act


def down_scatter_fp8(aq: torch.Tensor, a_s: torch.Tensor, w2: torch.Tensor, w2_s: torch.Tensor, al: Alignment,
                     cfg: GemmConfig, out: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """aq [max_padded, I] e4m3 + a_s [max_padded, ceil(I/128)], w2 [E, H, I] e4m3 + w2_s
    [E, ceil(H/128), ceil(I/128)] -> out[sorted_ids[p]] (rows < al.num_rows), * weights[id]."""
    _check_block_k(cfg)
    num_experts, hidden, inter = w2.shape
    if aq.shape[0] == 0:
        return out
    assert aq.stride(1) == 1 and w2.stride(2) == 1 and out.stride(1) == 1 and a_s.stride(1) == 1 and w2_s.stride(2) == 1
    if weights is not None:
        assert weights.dtype == torch.float32 and weights.is_contiguous() and weights.numel() == al.num_rows
    grid = (al.max_blocks * triton.cdiv(hidden, cfg.BLOCK_N),)
    _down_scatter_fp8_kernel[grid](
        aq, a_s, w2, w2_s, out, aq if weights is None else weights, al.sorted_ids, al.block_expert, al.num_padded,
        al.num_rows, al.max_blocks, hidden, inter,
        aq.stride(0), a_s.stride(0), w2.stride(0), w2.stride(1), w2_s.stride(0), w2_s.stride(1), out.stride(0),
        MUL_WEIGHT=weights is not None, EVEN_K=inter % cfg.BLOCK_K == 0, INTERP_BF16=dot_mode(out.dtype)[1],
        SCALE_BLOCK=GROUP, BLOCK_M=al.block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
