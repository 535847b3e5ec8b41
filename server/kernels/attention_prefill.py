"""Triton varlen causal attention over new tokens plus a cached prefix, reading the paged cache.

Why a Triton kernel and not torch SDPA per sequence: a step's prefill holds many sequences
of different lengths (the benchmark's default is 128 prompts of 64 tokens), and with a
cached prefix (chunked prefill, prefix reuse) the causal mask is bottom-right aligned
(query i of a q_len chunk sees keys 0..ctx-q_len+i). SDPA needs one launch per sequence
plus a gather of its prefix out of the pages, and its `is_causal` is top-left aligned when
q_len != kv_len. This kernel does the whole ragged batch in one launch, reads K/V in place
from the pages (the new tokens are written there first), and handles any prefix; q_len = 1
rows make it a decode kernel too, so mixed batches need no second path.

Grid: (query blocks of BLOCK_M rows, sequences, q heads). Each program walks keys up to the
last position its rows may see; fp32 online softmax in the log2 domain.
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
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, ctx_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    mb = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_ptr + s)
    q_len = tl.load(cu_ptr + s + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + s)
    prefix = ctx - q_len
    kvh = h // GROUP

    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] row within the sequence's new tokens
    row_ok = i < q_len
    q_pos = prefix + i  # [BM] absolute positions
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    tok = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, D]

    q = dot_operand(q, INTERP_BF16)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    hi = tl.minimum(ctx, prefix + (mb + 1) * BLOCK_M)  # keys past the block's last row are masked anyway
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(0, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BN]
        ok = pos < hi
        page = tl.load(bt_row + pos // PAGE, mask=ok, other=0).to(tl.int64)
        off = pos % PAGE
        kd_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + (page * stride_kb + off * stride_kt + kvh * stride_kh)[:, None] + d[None, :],
                    mask=kd_ok, other=0.0)  # [BN, D]
        scores = tl.dot(q, tl.trans(dot_operand(k, INTERP_BF16)), input_precision=DOT_PRECISION) * scale_log2  # [BM, BN]
        visible = (pos[None, :] <= q_pos[:, None]) & ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite from the first tile on: key 0 is always visible
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + (page * stride_vb + off * stride_vt + kvh * stride_vh)[:, None] + d[None, :],
                    mask=kd_ok, other=0.0)
        p = dot_operand(cast_rtne(p, v.dtype, INTERP_BF16), INTERP_BF16)  # rounded as on the tensor cores
        acc = acc * alpha[:, None] + tl.dot(p, dot_operand(v, INTERP_BF16), input_precision=DOT_PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :], cast_rtne(o, out_ptr.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & d_ok[None, :])


def prefill_attention_triton(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], new tokens already written
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    cu_seqlens_q: torch.Tensor,  # [S+1] int32
    context_lens: torch.Tensor,  # [S] int32 (cached + new)
    scale: float | None = None,
    max_query_len: int | None = None,  # host int (ForwardBatch has query_lens); None -> one sync
    out: torch.Tensor | None = None,
    block_m: int | None = None,  # default 64 (16-bit), 16 (fp32: FMA dots, keep registers)
    block_n: int | None = None,  # default 64 (16-bit), 16 (fp32)
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:  # [T, Hq, D]
    num_tokens, num_heads, head_dim = q.shape
    wide = q.dtype == torch.float32
    block_m = block_m or (16 if wide else 64)
    block_n = block_n or (16 if wide else 64)
    num_seqs = cu_seqlens_q.numel() - 1
    num_kv_heads, group = check_paged_inputs(q, k_cache, v_cache, block_tables, context_lens, num_seqs)
    page = check_kernel_layout(q, k_cache, v_cache)  # KV block size
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = workspace((num_tokens, num_heads, head_dim), q.dtype, q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    cu = cu_seqlens_q.to(torch.int32)
    bt = block_tables.to(torch.int32)
    ctx = context_lens.to(torch.int32)
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    precision, interp_bf16 = dot_mode(q.dtype)
    _prefill_kernel[grid](
        q, k_cache, v_cache, bt, cu, ctx, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), bt.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim), PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=precision, INTERP_BF16=interp_bf16,
        num_warps=num_warps, num_stages=num_stages)
    return out
