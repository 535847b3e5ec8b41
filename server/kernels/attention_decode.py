"""Triton paged decode attention (one query token per sequence) and the KV-cache write.

One program per (sequence, kv head, split): it loads the GROUP query heads that share the kv
head as one [GROUP_PAD, D] tile, so each K/V tile is read from HBM once per group, and walks
its share of the context in BLOCK_N-token tiles (a tile may span several pages: each token's
page comes from the block table). Online softmax in the log2 domain, fp32 accumulators.

Split-KV: with few sequences (long-context decode) S * kv_heads programs cannot fill the GPU,
so the context is cut into NUM_SPLITS parts whose partial (output, log-sum-exp) are merged by
a second kernel. NUM_SPLITS is chosen from static shapes only (block_tables width), so the
grid is fixed for a captured CUDA graph. With one split the first kernel writes the output.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention_reference import check_paged_inputs
from .availability import dot_mode
from .triton_helpers import cast_rtne, check_kernel_layout, dot_operand
from .workspace import workspace

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    scale_log2,
    stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_os, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + s)
    per_split = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, ctx)

    g = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + g  # [GP] query heads of this kv head
    d = tl.arange(0, D_PAD)
    hd_ok = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=hd_ok, other=0.0)  # [GP, D]

    q = dot_operand(q, INTERP_BF16)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BN]
        ok = pos < hi
        page = tl.load(bt_row + pos // PAGE, mask=ok, other=0).to(tl.int64)
        off = pos % PAGE
        kd_ok = ok[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + (page * stride_kb + off * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                    mask=kd_ok, other=0.0)  # [BN, D]
        scores = tl.dot(q, tl.trans(dot_operand(k, INTERP_BF16)), input_precision=DOT_PRECISION) * scale_log2  # [GP, BN]
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + (page * stride_vb + off * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
                    mask=kd_ok, other=0.0)  # [BN, D]
        p = dot_operand(cast_rtne(p, v.dtype, INTERP_BF16), INTERP_BF16)  # rounded as on the tensor cores
        acc = acc * alpha[:, None] + tl.dot(p, dot_operand(v, INTERP_BF16), input_precision=DOT_PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]  # empty split: acc = 0 -> 0
    if NUM_SPLITS == 1:
        tl.store(out_ptr + s * stride_os + heads[:, None] * stride_oh + d[None, :], cast_rtne(o, out_ptr.dtype.element_ty, INTERP_BF16),
                 mask=hd_ok)
    else:
        row = (s * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split  # [GP] into [S, Hq, NUM_SPLITS]
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=hd_ok)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g < GROUP)


@triton.jit
def _decode_merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, stride_os, stride_oh, num_heads,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         INTERP_BF16: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    base = (s * num_heads + h) * NUM_SPLITS
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, D_PAD)
    lse = tl.load(part_lse_ptr + base + sp)  # [NS]
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # empty splits -> 0
    o = tl.load(part_o_ptr + (base + sp)[:, None] * HEAD_DIM + d[None, :], mask=(d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + s * stride_os + h * stride_oh + d, cast_rtne(res, out_ptr.dtype.element_ty, INTERP_BF16),
             mask=d < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int = 132,
                      min_tokens_per_split: int = 256, max_splits: int = 64) -> int:
    """Enough (sequence, kv head, split) programs to fill ~2 waves, each split >= 256 tokens."""
    programs = max(num_seqs * num_kv_heads, 1)
    want = triton.cdiv(2 * num_sms, programs)
    cap = max(1, max_context // min_tokens_per_split)
    n = max(1, min(want, cap, max_splits))
    return 1 << (n.bit_length() - 1)  # power of two (tl.arange in the merge)


def paged_decode_attention_triton(
    q: torch.Tensor,  # [S, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    context_lens: torch.Tensor,  # [S] int32, >= 1
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,  # default 64 (16-bit), 16 (fp32: FMA dots, keep registers)
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:  # [S, Hq, D]
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, group = check_paged_inputs(q, k_cache, v_cache, block_tables, context_lens, num_seqs)
    block_n = block_n or (16 if q.dtype == torch.float32 else 64)
    page = check_kernel_layout(q, k_cache, v_cache)  # KV block size
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = workspace((num_seqs, num_heads, head_dim), q.dtype, q.device)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * page,
                                       _num_sms(q.device))
    if num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    bt = block_tables.to(torch.int32)
    ctx = context_lens.to(torch.int32)
    part_o = part_lse = out  # placeholders when one split
    if num_splits > 1:
        part_o = workspace((num_seqs, num_heads, num_splits, head_dim), torch.float32, q.device)
        part_lse = workspace((num_seqs, num_heads, num_splits), torch.float32, q.device)
    d_pad = triton.next_power_of_2(head_dim)
    precision, interp_bf16 = dot_mode(q.dtype)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, bt, ctx, out, part_o, part_lse, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), bt.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, D_PAD=d_pad,
        PAGE=page, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        DOT_PRECISION=precision, INTERP_BF16=interp_bf16,
        num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        _decode_merge_kernel[(num_seqs, num_heads)](
            part_o, part_lse, out, out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SPLITS=num_splits, INTERP_BF16=interp_bf16)
    return out


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits so tests exercise the merge


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_vt, stride_ct, ROW: tl.constexpr,
                     ROW_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        i = tl.arange(0, ROW_PAD)
        ok = i < ROW
        tl.store(kc_ptr + slot * stride_ct + i, tl.load(k_ptr + t * stride_kt + i, mask=ok), mask=ok)
        tl.store(vc_ptr + slot * stride_ct + i, tl.load(v_ptr + t * stride_vt + i, mask=ok), mask=ok)


def write_kv_cache_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] -> k_cache/v_cache slots (block*block_size+offset); slots < 0 skipped. No sync."""
    num_tokens = slot_mapping.shape[0]
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if k.shape != (num_tokens, kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k/v must be [T={num_tokens}, {kv_heads}, {head_dim}], got {tuple(k.shape)} / {tuple(v.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if num_tokens == 0:
        return
    k = k.to(k_cache.dtype).reshape(num_tokens, -1)
    v = v.to(v_cache.dtype).reshape(num_tokens, -1)
    if k.stride(1) != 1 or v.stride(1) != 1:
        k, v = k.contiguous(), v.contiguous()
    row = kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), row,
                                    ROW=row, ROW_PAD=triton.next_power_of_2(row))
