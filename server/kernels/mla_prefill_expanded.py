"""Triton varlen causal flash attention for MLA prefill in the expanded (decompressed) form.

Why: for long prompts the absorbed form (mla_attention.py) does 2 * (512 + 64) + 2 * 512 FLOPs
per (query, key, head); with the sequence's latent rows decompressed once through kv_b_proj,
K = [W_UK c | k_rope] (192 dims) and V = W_UV c (128 dims) need 2 * 192 + 2 * 128, ~3.4x fewer
(mla_prefill_config.py says when it pays; server/model/mla_attention.py builds the inputs).

Shapes (any strides, last dim contiguous), S sequences:
    q_nope [T, H, DN]   q_rope [T, H, DR]        T = cu_seqlens_q[S] new tokens
    k_nope [Lk, H, DN]  k_rope [Lk, H or 1, DR]  Lk = cu_seqlens_k[S] keys: each sequence's
    v      [Lk, H, DV]  out    [T, H, DV]        whole context (cached prefix, then the new tokens)
Sequence s's queries are the last q_len of its ctx keys (bottom-right causal), so chunked
prefill over a cached prefix and whole prompts are the same kernel.

Dqk = 192 is not a power of two, which tl.arange / tl.dot tiles need. The score is computed as
two dots, q_nope . k_nope (128) + q_rope . k_rope (64), accumulated into one fp32 tile, instead
of one dot over a 256-padded tile: padding would spend a quarter of the QK^T tensor work and
loads on zeros. The split also lets the RoPE key, which MLA shares between heads, be passed as
[Lk, 1, DR] with head stride 0 (read once per tile from L2) instead of copied per head. Widths
that are not powers of two (tests) are loaded padded to the next one, at least 16.

One program: BLOCK_M queries of one head of one sequence; grid (query blocks, H, S), static in
S, H and the longest query length. fp32 online softmax in the log2 domain. Key tiles that every
row of the block sees in full run without masks; only the diagonal tiles mask. Query blocks run
last-first (the causal ones with the most keys start first, so the short ones fill the tail),
and a block's neighbours in launch order are the same head's other blocks, which re-read the
same K/V from L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .availability import dot_mode
from .mla_prefill_config import MLAPrefillConfig, get_mla_prefill_config
from .triton_helpers import cast_rtne, dot_operand
from .workspace import workspace

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(base, rows, rows_ok, stride, D: tl.constexpr, D_PAD: tl.constexpr, MASK_ROWS: tl.constexpr):
    """[len(rows), D_PAD] tile of rows at base + row * stride (zeros past D, and for masked rows)."""
    d = tl.arange(0, D_PAD)
    ptrs = base + rows.to(tl.int64)[:, None] * stride + d[None, :]
    if D_PAD == D:
        if MASK_ROWS:
            return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        return tl.load(ptrs)
    if MASK_ROWS:
        return tl.load(ptrs, mask=rows_ok[:, None] & (d < D)[None, :], other=0.0)
    return tl.load(ptrs, mask=(d < D)[None, :], other=0.0)


@triton.jit
def _key_tile(acc, l_i, m_i, q_n, q_r, kn_base, kr_base, v_base, s_kn, s_kr, s_v, n0, hi, q_pos, scale_log2,
              DN: tl.constexpr, DN_PAD: tl.constexpr, DR: tl.constexpr, DR_PAD: tl.constexpr,
              DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One BLOCK_N key tile into the running (acc [BM, DV_PAD], l_i [BM], m_i [BM])."""
    n = n0 + tl.arange(0, BLOCK_N)  # [BN] key positions within the sequence
    n_ok = n < hi
    k_n = dot_operand(_load_rows(kn_base, n, n_ok, s_kn, DN, DN_PAD, MASKED), INTERP_BF16)  # [BN, DN]
    k_r = dot_operand(_load_rows(kr_base, n, n_ok, s_kr, DR, DR_PAD, MASKED), INTERP_BF16)  # [BN, DR]
    v = _load_rows(v_base, n, n_ok, s_v, DV, DV_PAD, MASKED)  # [BN, DV]
    scores = tl.dot(q_n, tl.trans(k_n), input_precision=DOT_PRECISION)  # [BM, BN]
    scores = tl.dot(q_r, tl.trans(k_r), scores, input_precision=DOT_PRECISION)
    scores = scores * scale_log2
    if MASKED:
        visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: key 0 is visible to every row, and comes first
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = dot_operand(cast_rtne(p, v.dtype, INTERP_BF16), INTERP_BF16)  # rounded as on the tensor cores
    acc = tl.dot(p, dot_operand(v, INTERP_BF16), acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["num_m_blocks"])  # changes with every step's longest prompt: one compile
def _expanded_prefill_kernel(
    qn_ptr, qr_ptr, kn_ptr, kr_ptr, v_ptr, out_ptr, cu_q_ptr, cu_k_ptr, scale_log2, num_m_blocks,
    s_qn_t, s_qn_h, s_qr_t, s_qr_h, s_kn_t, s_kn_h, s_kr_t, s_kr_h, s_v_t, s_v_h, s_o_t, s_o_h,
    DN: tl.constexpr, DN_PAD: tl.constexpr, DR: tl.constexpr, DR_PAD: tl.constexpr, DV: tl.constexpr,
    DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    mb = num_m_blocks - 1 - tl.program_id(0)  # latest (longest) query blocks first
    h = tl.program_id(1)
    s = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + s)
    q_len = tl.load(cu_q_ptr + s + 1) - q_start
    m0 = mb * BLOCK_M
    if m0 >= q_len:
        return
    k_start = tl.load(cu_k_ptr + s)
    ctx = tl.load(cu_k_ptr + s + 1) - k_start
    prefix = ctx - q_len  # cached keys before the first new token
    i = m0 + tl.arange(0, BLOCK_M)  # [BM] query index within the sequence
    row_ok = i < q_len
    q_pos = prefix + i  # [BM] each query's position: it sees keys 0..q_pos
    tok = q_start + i  # [BM] row of q / out
    q_n = _load_rows(qn_ptr + h * s_qn_h, tok, row_ok, s_qn_t, DN, DN_PAD, True)  # [BM, DN]
    q_r = _load_rows(qr_ptr + h * s_qr_h, tok, row_ok, s_qr_t, DR, DR_PAD, True)  # [BM, DR]
    q_n = dot_operand(q_n, INTERP_BF16)
    q_r = dot_operand(q_r, INTERP_BF16)
    k0 = k_start.to(tl.int64)
    kn_base = kn_ptr + k0 * s_kn_t + h * s_kn_h
    kr_base = kr_ptr + k0 * s_kr_t + h * s_kr_h
    v_base = v_ptr + k0 * s_v_t + h * s_v_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    # keys 0..prefix+m0 are visible to every row of the block: whole tiles of them need no mask
    full_end = (prefix + m0 + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _key_tile(acc, l_i, m_i, q_n, q_r, kn_base, kr_base, v_base, s_kn_t, s_kr_t, s_v_t, n0,
                                  full_end, q_pos, scale_log2, DN, DN_PAD, DR, DR_PAD, DV, DV_PAD, BLOCK_N,
                                  False, DOT_PRECISION, INTERP_BF16)
    hi = tl.minimum(ctx, prefix + m0 + BLOCK_M)  # the block's last query sees no key past this
    for n0 in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _key_tile(acc, l_i, m_i, q_n, q_r, kn_base, kr_base, v_base, s_kn_t, s_kr_t, s_v_t, n0,
                                  hi, q_pos, scale_log2, DN, DN_PAD, DR, DR_PAD, DV, DV_PAD, BLOCK_N,
                                  True, DOT_PRECISION, INTERP_BF16)

    o = acc / l_i[:, None]  # l_i >= 1 on every row (its maximum contributes exp2(0))
    dv = tl.arange(0, DV_PAD)
    ptrs = out_ptr + h * s_o_h + tok.to(tl.int64)[:, None] * s_o_t + dv[None, :]
    tl.store(ptrs, cast_rtne(o, out_ptr.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None] & (dv < DV)[None, :])


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def mla_prefill_expanded_triton(
    q_nope: torch.Tensor,  # [T, H, DN]
    q_rope: torch.Tensor,  # [T, H, DR]
    k_nope: torch.Tensor,  # [Lk, H, DN]
    k_rope: torch.Tensor,  # [Lk, H, DR] or [Lk, 1, DR] (shared by the heads)
    v: torch.Tensor,  # [Lk, H, DV]
    cu_seqlens_q: torch.Tensor,  # [S+1] int32 new-token offsets into T
    cu_seqlens_k: torch.Tensor,  # [S+1] int32 context offsets into Lk (ctx_s >= q_len_s)
    scale: float,
    *,
    max_query_len: int,  # host int: the grid's query blocks
    config: MLAPrefillConfig | None = None,
    out: torch.Tensor | None = None,  # [T, H, DV]
) -> torch.Tensor:  # [T, H, DV]
    num_tokens, heads, dn = q_nope.shape
    lk, dr, dv = k_nope.shape[0], q_rope.shape[2], v.shape[2]
    if q_rope.shape[:2] != (num_tokens, heads) or k_nope.shape != (lk, heads, dn) or v.shape[:2] != (lk, heads):
        raise ValueError(f"shapes disagree: q_nope {tuple(q_nope.shape)}, q_rope {tuple(q_rope.shape)}, "
                         f"k_nope {tuple(k_nope.shape)}, v {tuple(v.shape)}")
    if k_rope.dim() != 3 or k_rope.shape[0] != lk or k_rope.shape[1] not in (1, heads) or k_rope.shape[2] != dr:
        raise ValueError(f"k_rope must be [{lk}, {heads} or 1, {dr}], got {tuple(k_rope.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both be [S+1]")
    if len({t.dtype for t in (q_nope, q_rope, k_nope, k_rope, v)}) != 1:
        raise ValueError("q, k and v must share a dtype")
    q_nope, q_rope, k_nope, k_rope, v = map(_last_dim_contiguous, (q_nope, q_rope, k_nope, k_rope, v))
    if out is None:
        out = workspace((num_tokens, heads, dv), q_nope.dtype, q_nope.device)
    num_seqs = cu_seqlens_q.numel() - 1
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    cfg = config or get_mla_prefill_config(heads, dn + dr, dv, q_nope.dtype, q_nope.device)
    m_blocks = triton.cdiv(max_query_len, cfg.BLOCK_M)
    precision, interp_bf16 = dot_mode(q_nope.dtype)
    kr_head_stride = 0 if k_rope.shape[1] == 1 else k_rope.stride(1)
    _expanded_prefill_kernel[(m_blocks, heads, num_seqs)](
        q_nope, q_rope, k_nope, k_rope, v, out, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
        scale * LOG2E, m_blocks,
        q_nope.stride(0), q_nope.stride(1), q_rope.stride(0), q_rope.stride(1), k_nope.stride(0), k_nope.stride(1),
        k_rope.stride(0), kr_head_stride, v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        DN=dn, DN_PAD=_pad(dn), DR=dr, DR_PAD=_pad(dr), DV=dv, DV_PAD=_pad(dv), BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N, DOT_PRECISION=precision, INTERP_BF16=interp_bf16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def mla_prefill_expanded_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, scale: float, rope_dim: int, **kw) -> torch.Tensor:
    """q [T, H, Dqk], k [Lk, H, Dqk] (nope dims, then rope_dim RoPE dims), v [Lk, H, Dv] -> [T, H, Dv]:
    the same kernel on views of whole K rows."""
    dn = q.shape[2] - rope_dim
    return mla_prefill_expanded_triton(q[..., :dn], q[..., dn:], k[..., :dn], k[..., dn:], v, cu_seqlens_q,
                                       cu_seqlens_k, scale, **kw)
