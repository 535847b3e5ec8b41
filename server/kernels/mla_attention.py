"""Triton MLA attention over the paged latent cache (decode with split-KV, and varlen prefill).

After weight absorption every head attends over the same latent rows [Dk = DV + DR] (kv_lora_rank
values, then the RoPE key), and the values are the rows' first DV entries (mla_reference.py has
the math and the torch twins). So a program takes BLOCK_M (token, head) query rows of one
sequence — in decode, BLOCK_M heads of its one token — and walks the sequence's pages in
BLOCK_N-row tiles: each latent tile is loaded once for all BLOCK_M rows and used twice, for
the scores (q_latent . c + q_rope . k_rope) and for the output (p @ c). fp32 online softmax in
the log2 domain. Head blocks of a sequence are neighbouring programs (grid axis 0), so when
H > BLOCK_M the repeated reads of its pages come from L2.

Query rows of a sequence are contiguous in q [T, H, Dk] (row = token * H + head), so one
kernel serves decode (q_len = 1), prefill and chunked prefill (bottom-right causal over the
cached prefix). Decode may split the context over NUM_SPLITS programs per row block, whose
partial (output, log-sum-exp) a second kernel merges; NUM_SPLITS depends on static shapes only
(batch, block-table width), so a captured CUDA graph keeps its grid.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .availability import dot_mode
from .mla_reference import check_mla_inputs
from .triton_helpers import cast_rtne, dot_operand
from .workspace import workspace

LOG2E = 1.4426950408889634


@triton.jit
def _mla_kernel(
    q_ptr, c_ptr, bt_ptr, cu_ptr, ctx_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    scale_log2, stride_cb, stride_ct, stride_bt,
    NUM_HEADS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, DR: tl.constexpr,
    DR_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    mb = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + s)
    if DECODE:
        q_start = s
        q_len = 1
    else:
        q_start = tl.load(cu_ptr + s)
        q_len = tl.load(cu_ptr + s + 1) - q_start
    if mb * BLOCK_M >= q_len * NUM_HEADS:
        return
    prefix = ctx - q_len
    r = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] row within the sequence: token * H + head
    row_ok = r < q_len * NUM_HEADS
    q_pos = prefix + r // NUM_HEADS  # [BM] absolute position of each row's token
    row = (q_start * NUM_HEADS + r).to(tl.int64)  # [BM] row of q / out
    dv = tl.arange(0, DV_PAD)
    dr = tl.arange(0, DR_PAD)
    dv_ok = dv < DV
    dr_ok = dr < DR
    q_c = tl.load(q_ptr + row[:, None] * DK + dv[None, :], mask=row_ok[:, None] & dv_ok[None, :], other=0.0)  # [BM, DV]
    q_r = tl.load(q_ptr + row[:, None] * DK + DV + dr[None, :], mask=row_ok[:, None] & dr_ok[None, :], other=0.0)
    q_c = dot_operand(q_c, INTERP_BF16)
    q_r = dot_operand(q_r, INTERP_BF16)

    last_token = tl.minimum((mb * BLOCK_M + BLOCK_M - 1) // NUM_HEADS, q_len - 1)
    hi = tl.minimum(ctx, prefix + last_token + 1)  # keys past the block's last token are masked anyway
    lo = 0
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tl.cdiv(hi, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BN]
        ok = pos < hi
        page = tl.load(bt_row + pos // PAGE, mask=ok, other=0).to(tl.int64)
        base = page * stride_cb + (pos % PAGE) * stride_ct  # [BN] row offsets in the cache
        c = tl.load(c_ptr + base[:, None] + dv[None, :], mask=ok[:, None] & dv_ok[None, :], other=0.0)  # [BN, DV]
        k_r = tl.load(c_ptr + base[:, None] + DV + dr[None, :], mask=ok[:, None] & dr_ok[None, :], other=0.0)  # [BN, DR]
        c_op = dot_operand(c, INTERP_BF16)
        scores = tl.dot(q_c, tl.trans(c_op), input_precision=DOT_PRECISION)
        scores += tl.dot(q_r, tl.trans(dot_operand(k_r, INTERP_BF16)), input_precision=DOT_PRECISION)
        scores = scores * scale_log2  # [BM, BN]
        visible = (pos[None, :] <= q_pos[:, None]) & ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: key `lo` is visible to every row
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = dot_operand(cast_rtne(p, c.dtype, INTERP_BF16), INTERP_BF16)  # rounded as on the tensor cores
        acc = acc * alpha[:, None] + tl.dot(p, c_op, input_precision=DOT_PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]  # an empty split: acc = 0 -> 0
    out_mask = row_ok[:, None] & dv_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + row[:, None] * DV + dv[None, :], cast_rtne(o, out_ptr.dtype.element_ty, INTERP_BF16),
                 mask=out_mask)
    else:
        part = row * NUM_SPLITS + split  # [BM] into [rows, NUM_SPLITS]
        tl.store(part_o_ptr + part[:, None] * DV + dv[None, :], o, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, DV: tl.constexpr, DV_PAD: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, INTERP_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, DV_PAD)
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + sp)  # [NS]
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # empty splits -> 0
    o = tl.load(part_o_ptr + (row * NUM_SPLITS + sp)[:, None] * DV + d[None, :], mask=(d < DV)[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * DV + d, cast_rtne(res, out_ptr.dtype.element_ty, INTERP_BF16), mask=d < DV)


@triton.jit
def _write_rows_kernel(x_ptr, cache_ptr, slot_ptr, stride_x, DK: tl.constexpr, DK_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        i = tl.arange(0, DK_PAD)
        ok = i < DK
        tl.store(cache_ptr + slot * DK + i, tl.load(x_ptr + t * stride_x + i, mask=ok), mask=ok)


def write_latent_cache_triton(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """latent [T, Dk] -> cache rows slot_mapping [T]; slots < 0 (padding) skipped. No host sync."""
    num_tokens, dk = slot_mapping.shape[0], cache.shape[2]
    if latent.shape != (num_tokens, dk):
        raise ValueError(f"latent must be [T={num_tokens}, {dk}], got {tuple(latent.shape)}")
    if not cache.is_contiguous():
        raise ValueError("the latent cache must be contiguous")
    if num_tokens == 0:
        return
    latent = latent.to(cache.dtype)
    if latent.stride(1) != 1:
        latent = latent.contiguous()
    _write_rows_kernel[(num_tokens,)](latent, cache, slot_mapping, latent.stride(0), DK=dk,
                                      DK_PAD=triton.next_power_of_2(dk))


def default_blocks(dtype: torch.dtype, v_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): fp32 (tests) small tiles; 16-bit 32x32 tiles, 8 warps for
    wide latents (the [BLOCK_M, kv_lora_rank] fp32 accumulator is what limits registers)."""
    if dtype == torch.float32:
        return 16, 16, 4
    return 32, 32, 8 if v_dim >= 256 else 4


def choose_num_splits(programs: int, max_context: int, num_sms: int, min_tokens_per_split: int = 256,
                      max_splits: int = 32) -> int:
    """Enough (row block, sequence, split) programs for ~2 waves, each split >= 256 tokens; a power of two."""
    want = triton.cdiv(2 * num_sms, max(programs, 1))
    n = max(1, min(want, max(1, max_context // min_tokens_per_split), max_splits))
    return 1 << (n.bit_length() - 1)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits so tests exercise the merge


def mla_attention_triton(
    q: torch.Tensor,  # [T, H, Dk]
    cache: torch.Tensor,  # [num_blocks, block_size, Dk], this step's rows written
    block_tables: torch.Tensor,  # [S, W] int32
    cu_seqlens_q: torch.Tensor | None,  # [S+1] int32; None: decode (T = S, one token each)
    context_lens: torch.Tensor,  # [S] int32, cached + new
    v_dim: int,
    scale: float,
    *,
    max_query_len: int = 1,  # host int: the grid's row blocks (decode: 1)
    num_splits: int | None = None,  # decode only; None: choose from the static shapes
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, H, v_dim]
    num_tokens, num_heads, dk = q.shape
    decode = cu_seqlens_q is None
    num_seqs = num_tokens if decode else cu_seqlens_q.numel() - 1
    check_mla_inputs(q, cache, block_tables, context_lens, num_seqs, v_dim)
    if not q.is_contiguous() or not cache.is_contiguous():
        raise ValueError("q and the latent cache must be contiguous")
    page = cache.shape[1]
    if page & (page - 1):
        raise ValueError(f"block_size must be a power of two, got {page}")
    bm, bn, warps = default_blocks(q.dtype, v_dim)
    block_m, block_n, num_warps = block_m or bm, block_n or bn, num_warps or warps
    if out is None:
        out = workspace((num_tokens, num_heads, v_dim), q.dtype, q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    row_blocks = triton.cdiv((1 if decode else max_query_len) * num_heads, block_m)
    if not decode:
        num_splits = 1
    elif num_splits is None:
        num_splits = choose_num_splits(row_blocks * num_seqs, block_tables.shape[1] * page, _num_sms(q.device))
    if num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    bt = block_tables.to(torch.int32)
    ctx = context_lens.to(torch.int32)
    cu = ctx if decode else cu_seqlens_q.to(torch.int32)  # unused in decode
    part_o = part_lse = out  # placeholders with one split
    if num_splits > 1:
        part_o = workspace((num_tokens * num_heads, num_splits, v_dim), torch.float32, q.device)
        part_lse = workspace((num_tokens * num_heads, num_splits), torch.float32, q.device)
    precision, interp_bf16 = dot_mode(q.dtype)
    dv_pad = max(16, triton.next_power_of_2(v_dim))
    _mla_kernel[(row_blocks, num_seqs, num_splits)](
        q, cache, bt, cu, ctx, out, part_o, part_lse, scale * LOG2E, cache.stride(0), cache.stride(1), bt.stride(0),
        NUM_HEADS=num_heads, DK=dk, DV=v_dim, DV_PAD=dv_pad, DR=dk - v_dim,
        DR_PAD=max(16, triton.next_power_of_2(dk - v_dim)), PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, DECODE=decode, DOT_PRECISION=precision, INTERP_BF16=interp_bf16,
        num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        _merge_kernel[(num_tokens * num_heads,)](part_o, part_lse, out, DV=v_dim, DV_PAD=dv_pad,
                                                 NUM_SPLITS=num_splits, INTERP_BF16=interp_bf16)
    return out


def mla_decode_triton(q, cache, block_tables, context_lens, v_dim: int, scale: float, **kw) -> torch.Tensor:
    """q [S, H, Dk], one new token per sequence -> [S, H, v_dim]."""
    return mla_attention_triton(q, cache, block_tables, None, context_lens, v_dim, scale, **kw)


def mla_prefill_triton(q, cache, block_tables, cu_seqlens_q, context_lens, v_dim: int, scale: float, *,
                       max_query_len: int | None = None, **kw) -> torch.Tensor:
    """q [T, H, Dk] of S sequences (cu_seqlens_q [S+1]) -> [T, H, v_dim]."""
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())  # one sync; callers pass it
    return mla_attention_triton(q, cache, block_tables, cu_seqlens_q, context_lens, v_dim, scale,
                                max_query_len=max_query_len, **kw)
