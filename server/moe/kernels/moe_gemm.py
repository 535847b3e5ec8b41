"""Grouped GEMMs over aligned rows (see moe_align.py) and the weighted combine.

gate_up_silu: act[p] = silu(x[row(p)] @ gate_e^T) * (x[row(p)] @ up_e^T)    act [max_padded, I]
    Rows are gathered through sorted_ids (row = id // ROW_DIV: a top-k slot maps to its token),
    and the product is written at the sorted position p, so the down GEMM reads A contiguously.
    Each program holds two fp32 accumulators (gate and up columns n and I+n of w13[e]), so the
    SiLU-and-multiply happens in registers and the [*, 2I] tensor never exists.
down_scatter: out[id(p)] = w[id(p)] * act[p] @ w2_e^T                       out [rows, H]
    The routing weight (optional) is applied to the fp32 accumulator before rounding.
combine_slots: y[t] = sum over valid j of slots[t*k + j]                    y [T, H]
    k reads per output row in a fixed order: deterministic, no atomics.

Padding positions (sentinel ids) compute on a real row (row 0) and are never stored: GEMM
rows are independent, so this costs nothing in correctness and saves masks in the K loop.

Row counts change every step, so the kernels do not specialise on them (ROW_COUNTS): Triton
would otherwise compile a new variant whenever a count turns 1 or a multiple of 16. Only the
config's tile constexprs select a variant, and the engine compiles every config at start-up
(server/worker/warmup.py). Strides and pointers keep their divisibility hints.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels.availability import dot_mode
from .moe_align import Alignment
from .moe_config import GemmConfig
from ...kernels.triton_helpers import cast_rtne, dot_operand
from ...kernels.workspace import workspace

ROW_COUNTS = ["num_rows", "max_blocks"]  # per-step sizes: one compiled kernel for all of them


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M consecutive M-blocks share each weight tile in L2."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    return pid_m, pid_n


@triton.jit(do_not_specialize=ROW_COUNTS)
def _gate_up_silu_kernel(
    x_ptr, w13_ptr, act_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_rows, max_blocks, I, H,
    stride_xm, stride_we, stride_wn, stride_am,
    ROW_DIV: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
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
    a_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    g_ptrs = w13_ptr + expert * stride_we + offs_nw[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    u_ptrs = g_ptrs + I * stride_wn
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
        a, g, u = dot_operand(a, INTERP_BF16), dot_operand(g, INTERP_BF16), dot_operand(u, INTERP_BF16)
        acc_g = tl.dot(a, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    act = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, fp32
    out_ptrs = act_ptr + offs_p[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    tl.store(out_ptrs, cast_rtne(act, act_ptr.dtype.element_ty, INTERP_BF16), mask=(offs_n < I)[None, :])


@triton.jit(do_not_specialize=ROW_COUNTS)
def _down_scatter_kernel(
    act_ptr, w2_ptr, out_ptr, weights_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_rows, max_blocks, H, I,
    stride_am, stride_we, stride_wn, stride_om,
    MUL_WEIGHT: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
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
    a_ptrs = act_ptr + offs_p[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BM, BK]
    b_ptrs = w2_ptr + expert * stride_we + offs_nw[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < I - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        a, b = dot_operand(a, INTERP_BF16), dot_operand(b, INTERP_BF16)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + ids, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    out_ptrs = out_ptr + ids[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, cast_rtne(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None] & (offs_n < H)[None, :])


@triton.jit
def _combine_slots_kernel(slots_ptr, ids_ptr, out_ptr, H, E, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
                          INTERP_BF16: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j)
        take = h_ok & (e >= 0) & (e < E)
        acc += tl.load(slots_ptr + (t * TOP_K + j) * H + offs, mask=take, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, cast_rtne(acc, out_ptr.dtype.element_ty, INTERP_BF16), mask=h_ok)


def gate_up_silu(x: torch.Tensor, w13: torch.Tensor, al: Alignment, cfg: GemmConfig, row_div: int,
                 act: torch.Tensor | None = None) -> torch.Tensor:
    """x [*, H] (rows via al.sorted_ids // row_div), w13 [E, 2I, H] -> act [max_padded, I]."""
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    max_padded = al.sorted_ids.numel()
    if act is None:
        act = workspace((max_padded, inter), x.dtype, x.device)
    if max_padded == 0:
        return act
    assert x.stride(1) == 1 and w13.stride(2) == 1 and act.stride(1) == 1
    precision, interp_bf16 = dot_mode(x.dtype)
    grid = (al.max_blocks * triton.cdiv(inter, cfg.BLOCK_N),)
    _gate_up_silu_kernel[grid](
        x, w13, act, al.sorted_ids, al.block_expert, al.num_padded,
        al.num_rows, al.max_blocks, inter, hidden,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        ROW_DIV=row_div, EVEN_K=hidden % cfg.BLOCK_K == 0, DOT_PRECISION=precision, INTERP_BF16=interp_bf16,
        BLOCK_M=al.block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return act


def down_scatter(act: torch.Tensor, w2: torch.Tensor, al: Alignment, cfg: GemmConfig, out: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """act [max_padded, I], w2 [E, H, I] -> out[sorted_ids[p]] (rows < al.num_rows), * weights[id]."""
    num_experts, hidden, inter = w2.shape
    if act.shape[0] == 0:
        return out
    assert act.stride(1) == 1 and w2.stride(2) == 1 and out.stride(1) == 1
    if weights is not None:
        assert weights.dtype == torch.float32 and weights.is_contiguous() and weights.numel() == al.num_rows
    precision, interp_bf16 = dot_mode(act.dtype)
    grid = (al.max_blocks * triton.cdiv(hidden, cfg.BLOCK_N),)
    _down_scatter_kernel[grid](
        act, w2, out, act if weights is None else weights, al.sorted_ids, al.block_expert, al.num_padded,
        al.num_rows, al.max_blocks, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        MUL_WEIGHT=weights is not None, EVEN_K=inter % cfg.BLOCK_K == 0, DOT_PRECISION=precision, INTERP_BF16=interp_bf16,
        BLOCK_M=al.block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def combine_slots(slots: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor | None = None,
                  block_h: int = 1024) -> torch.Tensor:
    """slots [T*k, H] (weighted expert outputs), topk_ids [T, k] -> out [T, H]; invalid slots skipped."""
    num_tokens, top_k = topk_ids.shape
    hidden = slots.shape[1]
    if out is None:
        out = workspace((num_tokens, hidden), slots.dtype, slots.device)
    assert out.shape == (num_tokens, hidden) and out.is_contiguous()
    if num_tokens == 0:
        return out
    ids = topk_ids.to(torch.int32).contiguous()
    block_h = min(block_h, triton.next_power_of_2(hidden))
    _combine_slots_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        slots, ids, out, hidden, num_experts, TOP_K=top_k, BLOCK_H=block_h,
        INTERP_BF16=dot_mode(slots.dtype)[1])
    return out
