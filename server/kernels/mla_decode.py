"""Triton MLA decode over the paged latent cache: head blocks x KV splits, then an fp32 merge.

Why a decode-only kernel beside mla_attention.py's varlen one: in decode every head of a
sequence attends over the same latent rows [c | k_rope] (absorbed queries, mla_reference.py),
so the work is a [heads, Dk] x [Dk, L] product per sequence whose cost is reading the rows once
and keeping the tensor cores busy. This kernel is shaped for that and nothing else:

  * a program owns BLOCK_H heads of one sequence (64 by default: the M of one Hopper warpgroup
    MMA), so each latent tile is read once per head block and used twice, for the scores
    (q_latent . c + q_rope . k_rope) and for the output (p @ c); head blocks of a sequence are
    neighbouring programs (grid axis 0), so with 128 heads the second read hits L2;
  * the context is cut into whole BLOCK_N tiles; every tile but the sequence's last is loaded
    and scored without masks, and when a tile fits in a page its page id is one scalar load;
  * split-KV: num_splits programs per (sequence, head block) take equal runs of tiles (at least
    MIN_TILES each, so short contexts use fewer splits); each writes its normalised output and
    log2-sum-exp in fp32 and _merge_kernel combines them. Splits past a sequence's context do
    nothing and the merge never reads them.

num_splits is a launch argument (not a compile-time constant) chosen from static shapes
(mla_decode_config.choose_num_splits); per-step lengths are read on the device only, so a
captured CUDA graph replays with any context lengths. fp32 online softmax in the log2 domain.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .availability import dot_mode
from .mla_decode_config import (MAX_SPLITS, MLADecodeConfig, choose_num_splits, default_min_split_tokens,
                                get_mla_decode_config)
from .mla_reference import check_mla_inputs
from .triton_helpers import cast_rtne, dot_operand
from .workspace import workspace

LOG2E = 1.4426950408889634


@triton.jit
def _split_range(ctx, split, num_splits, BLOCK_N: tl.constexpr, MIN_TILES: tl.constexpr):
    """Token range [lo, hi) of `split` and the number of non-empty splits, in whole tiles."""
    tiles = tl.cdiv(ctx, BLOCK_N)
    per = tl.maximum(tl.cdiv(tiles, num_splits), MIN_TILES)  # >= 1, so ctx = 0 gives used = 0
    used = tl.cdiv(tiles, per)
    lo = split * per * BLOCK_N
    hi = tl.minimum(lo + per * BLOCK_N, ctx)
    return lo, hi, used


@triton.jit
def _load_rows(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """A [rows, cols] tile; masks only where they can be false (zero-filled)."""
    if MASK_ROWS and MASK_COLS:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _attend_tile(q_c, q_r, m_i, l_i, acc, c_ptr, bt_row, n0, ctx, scale_log2, stride_cb, stride_ct,
                 DV: tl.constexpr, DV_PAD: tl.constexpr, DR: tl.constexpr, DR_PAD: tl.constexpr,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 INTERP_BF16: tl.constexpr):
    """One online-softmax step over cache positions n0 .. n0 + BLOCK_N (MASKED: the tile holding
    position ctx - 1, whose rows past ctx are zero-filled and scored -inf)."""
    offs = tl.arange(0, BLOCK_N)
    pos = n0 + offs  # [BN]
    ok = pos < ctx
    if BLOCK_N <= PAGE:  # tiles start at multiples of BLOCK_N, which divides PAGE: one page
        page = tl.load(bt_row + n0 // PAGE).to(tl.int64)
        base = page * stride_cb + (n0 % PAGE + offs).to(tl.int64) * stride_ct  # [BN]
    else:
        if MASKED:
            pages = tl.load(bt_row + pos // PAGE, mask=ok, other=0).to(tl.int64)  # [BN]; padding ids unread
        else:
            pages = tl.load(bt_row + pos // PAGE).to(tl.int64)
        base = pages * stride_cb + (pos % PAGE).to(tl.int64) * stride_ct
    dv = tl.arange(0, DV_PAD)
    dr = tl.arange(0, DR_PAD)
    c = _load_rows(c_ptr + base[:, None] + dv[None, :], ok, dv < DV, MASKED, DV != DV_PAD)  # [BN, DV]
    k_r = _load_rows(c_ptr + base[:, None] + DV + dr[None, :], ok, dr < DR, MASKED, DR != DR_PAD)  # [BN, DR]
    c_op = dot_operand(c, INTERP_BF16)
    scores = tl.dot(q_c, tl.trans(c_op), input_precision=DOT_PRECISION)  # [BH, BN]
    scores = tl.dot(q_r, tl.trans(dot_operand(k_r, INTERP_BF16)), acc=scores, input_precision=DOT_PRECISION)
    scores = scores * scale_log2
    if MASKED:
        scores = tl.where(ok[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: position n0 < ctx is in every tile
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = dot_operand(cast_rtne(p, c.dtype, INTERP_BF16), INTERP_BF16)  # rounded as on the tensor cores
    acc = tl.dot(p, c_op, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)  # [BH, DV]
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["num_splits"])
def _mla_decode_kernel(
    q_ptr, c_ptr, bt_ptr, ctx_ptr, out_ptr, part_o_ptr, part_lse_ptr, scale_log2, num_splits,
    stride_qs, stride_qh, stride_cb, stride_ct, stride_bt, stride_os, stride_oh,
    NUM_HEADS: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, DR: tl.constexpr, DR_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MIN_TILES: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    hb = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + s)
    lo, hi, used = _split_range(ctx, split, num_splits, BLOCK_N, MIN_TILES)
    if SPLIT:
        if split >= used:
            return
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    h_ok = h < NUM_HEADS
    dv = tl.arange(0, DV_PAD)
    dr = tl.arange(0, DR_PAD)
    q_row = q_ptr + s.to(tl.int64) * stride_qs + h[:, None].to(tl.int64) * stride_qh  # [BH, 1]
    q_c = tl.load(q_row + dv[None, :], mask=h_ok[:, None] & (dv < DV)[None, :], other=0.0)  # [BH, DV]
    q_r = tl.load(q_row + DV + dr[None, :], mask=h_ok[:, None] & (dr < DR)[None, :], other=0.0)  # [BH, DR]
    q_c = dot_operand(q_c, INTERP_BF16)
    q_r = dot_operand(q_r, INTERP_BF16)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DV_PAD], tl.float32)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    for n0 in range(lo, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q_c, q_r, m_i, l_i, acc, c_ptr, bt_row, n0, ctx, scale_log2, stride_cb, stride_ct,
                                     DV, DV_PAD, DR, DR_PAD, PAGE, BLOCK_N, False, DOT_PRECISION, INTERP_BF16)
    if full_end < hi:
        m_i, l_i, acc = _attend_tile(q_c, q_r, m_i, l_i, acc, c_ptr, bt_row, full_end, ctx, scale_log2, stride_cb,
                                     stride_ct, DV, DV_PAD, DR, DR_PAD, PAGE, BLOCK_N, True, DOT_PRECISION, INTERP_BF16)

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]  # no context (ctx = 0): 0
    mask = h_ok[:, None] & (dv < DV)[None, :]
    if SPLIT:
        part = ((s * NUM_HEADS + h).to(tl.int64) * num_splits + split)  # [BH] into [S, H, num_splits]
        tl.store(part_o_ptr + part[:, None] * DV + dv[None, :], o, mask=mask)
        tl.store(part_lse_ptr + part, m_i + tl.log2(safe_l), mask=h_ok)
    else:
        out_row = out_ptr + s.to(tl.int64) * stride_os + h[:, None].to(tl.int64) * stride_oh
        tl.store(out_row + dv[None, :], cast_rtne(o, out_ptr.dtype.element_ty, INTERP_BF16), mask=mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(part_o_ptr, part_lse_ptr, ctx_ptr, out_ptr, num_splits, stride_os, stride_oh,
                  NUM_HEADS: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  MIN_TILES: tl.constexpr, INTERP_BF16: tl.constexpr):
    """out[s, h] = sum_i 2^(lse_i - top) o_i / sum_i 2^(lse_i - top) over the non-empty splits."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(ctx_ptr + s)
    _lo, _hi, used = _split_range(ctx, 0, num_splits, BLOCK_N, MIN_TILES)
    row = (s * NUM_HEADS + h).to(tl.int64) * num_splits
    d = tl.arange(0, DV_PAD)
    d_ok = d < DV
    top = tl.full([], float("-inf"), tl.float32)
    for i in range(0, used):
        top = tl.maximum(top, tl.load(part_lse_ptr + row + i))
    acc = tl.zeros([DV_PAD], tl.float32)
    total = tl.zeros([], tl.float32)
    for i in range(0, used):
        w = tl.exp2(tl.load(part_lse_ptr + row + i) - top)
        acc += w * tl.load(part_o_ptr + (row + i) * DV + d, mask=d_ok, other=0.0)
        total += w
    res = acc / tl.where(total > 0, total, 1.0)  # no context: 0
    dst = out_ptr + s.to(tl.int64) * stride_os + h.to(tl.int64) * stride_oh + d
    tl.store(dst, cast_rtne(res, out_ptr.dtype.element_ty, INTERP_BF16), mask=d_ok)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """SMs of `device`; 4 under the interpreter, so CPU tests launch several splits."""
    if device.type == "cuda":
        return _sm_count(torch.cuda.current_device() if device.index is None else device.index)
    return 4


def launch_plan(num_seqs: int, num_heads: int, v_dim: int, dk: int, page: int, width: int, dtype: torch.dtype,
                device: torch.device, config: MLADecodeConfig | None = None,
                num_splits: int | None = None) -> tuple[MLADecodeConfig, int, int]:
    """(config, num_splits, min_split_tokens) for a decode step, from static shapes only (`width`:
    the block-table width in pages). The warm-up asks this for every batch size it captures."""
    if config is not None:
        config.validate()  # stored configs are checked when their file is read, defaults are valid
    cfg = config or get_mla_decode_config(num_seqs, num_heads, v_dim, dk - v_dim, page, dtype, device)
    min_tokens = cfg.min_split_tokens or default_min_split_tokens(num_heads, v_dim, dk, dtype.itemsize)
    if num_splits is None:
        pairs = triton.cdiv(num_heads, cfg.BLOCK_H) * num_seqs
        num_splits = cfg.num_splits or choose_num_splits(pairs, width * page, num_sms(device), min_tokens)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    return cfg, num_splits, min_tokens


def mla_decode_headblock_triton(
    q: torch.Tensor,  # [S, H, Dk] absorbed queries, one new token per sequence
    cache: torch.Tensor,  # [num_blocks, block_size, Dk], this step's rows written
    block_tables: torch.Tensor,  # [S, W] int32 (padding entries may be anything, e.g. -1)
    context_lens: torch.Tensor,  # [S] int32, cached + new (on the device; never read on the host)
    v_dim: int,
    scale: float,
    *,
    config: MLADecodeConfig | None = None,  # None: the stored config for this device and shape, else defaults
    num_splits: int | None = None,  # None: the config's, else choose_num_splits
    out: torch.Tensor | None = None,  # [S, H, v_dim], last dim contiguous
) -> torch.Tensor:  # [S, H, v_dim]
    num_seqs, num_heads, dk = q.shape
    check_mla_inputs(q, cache, block_tables, context_lens, num_seqs, v_dim)
    if q.stride(2) != 1 or not cache.is_contiguous():
        raise ValueError("q needs a contiguous last dim and the latent cache must be contiguous")
    page = cache.shape[1]
    if page & (page - 1):
        raise ValueError(f"block_size must be a power of two, got {page}")
    if out is None:
        out = workspace((num_seqs, num_heads, v_dim), q.dtype, q.device)
    elif out.shape != (num_seqs, num_heads, v_dim) or out.stride(2) != 1 or out.dtype != q.dtype:
        raise ValueError(f"out must be [{num_seqs}, {num_heads}, {v_dim}] {q.dtype} with a contiguous last dim")
    if num_seqs == 0:
        return out
    cfg, num_splits, min_tokens = launch_plan(num_seqs, num_heads, v_dim, dk, page, block_tables.shape[1], q.dtype,
                                              q.device, config, num_splits)
    bt = block_tables.to(torch.int32)
    ctx = context_lens.to(torch.int32)
    split = num_splits > 1
    part_o = part_lse = out  # unused with one split
    if split:
        part_o = workspace((num_seqs, num_heads, num_splits, v_dim), torch.float32, q.device)
        part_lse = workspace((num_seqs, num_heads, num_splits), torch.float32, q.device)
    precision, interp_bf16 = dot_mode(q.dtype)
    dv_pad = max(16, triton.next_power_of_2(v_dim))
    min_tiles = triton.cdiv(min_tokens, cfg.BLOCK_N)
    _mla_decode_kernel[(triton.cdiv(num_heads, cfg.BLOCK_H), num_seqs, num_splits)](
        q, cache, bt, ctx, out, part_o, part_lse, scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), bt.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, DV=v_dim, DV_PAD=dv_pad, DR=dk - v_dim, DR_PAD=max(16, triton.next_power_of_2(dk - v_dim)),
        PAGE=page, BLOCK_H=cfg.BLOCK_H, BLOCK_N=cfg.BLOCK_N, MIN_TILES=min_tiles, SPLIT=split,
        DOT_PRECISION=precision, INTERP_BF16=interp_bf16, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split:
        _merge_kernel[(num_seqs, num_heads)](
            part_o, part_lse, ctx, out, num_splits, out.stride(0), out.stride(1), NUM_HEADS=num_heads, DV=v_dim,
            DV_PAD=dv_pad, BLOCK_N=cfg.BLOCK_N, MIN_TILES=min_tiles, INTERP_BF16=interp_bf16,
            num_warps=4 if v_dim >= 256 else 1)
    return out
