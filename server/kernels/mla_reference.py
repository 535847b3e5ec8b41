"""Torch twins of the MLA (multi-head latent attention) kernels over the paged latent cache.

Cache layout (per layer): latent_cache [num_blocks, block_size, Dk] with Dk = kv_lora_rank +
qk_rope_head_dim: each token's row is its normalised compressed KV (kv_lora_rank values)
followed by its RoPE key. Sequence s keeps position p in block block_tables[s, p // B] at
offset p % B, as the other paged kernels do.

With the up-projections absorbed into the query and the output (server/model/mla_attention.py),
MLA is multi-query attention with a single shared head: queries q [T, H, Dk] score against the
whole row, and the values are the first `v_dim` (= kv_lora_rank) entries of the same row.
context_lens count the tokens in the cache including this step's, which are written first
(write_latent_cache). Prefill is bottom-right causal over any cached prefix; q_len = 1 is decode.
"""
from __future__ import annotations

import torch


def check_mla_inputs(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     num_seqs: int, v_dim: int) -> None:
    if cache.dim() != 3:
        raise ValueError(f"latent cache must be [num_blocks, block_size, Dk], got {tuple(cache.shape)}")
    if q.dim() != 3 or q.shape[2] != cache.shape[2]:
        raise ValueError(f"q must be [tokens, heads, Dk={cache.shape[2]}], got {tuple(q.shape)}")
    if not 0 < v_dim <= cache.shape[2]:
        raise ValueError(f"v_dim={v_dim} must be in (0, Dk={cache.shape[2]}]")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [num_seqs={num_seqs}, max_blocks], got {tuple(block_tables.shape)}")
    if context_lens.dim() != 1 or context_lens.shape[0] != num_seqs:
        raise ValueError(f"context_lens must be [num_seqs={num_seqs}], got {tuple(context_lens.shape)}")
    if q.dtype != cache.dtype:
        raise ValueError(f"q and the latent cache must share a dtype, got {q.dtype} and {cache.dtype}")


def write_latent_cache(latent: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """latent [T, Dk] -> cache rows slot_mapping [T] (block * block_size + offset); slots < 0 skipped.
    (Boolean indexing syncs on the GPU; the Triton twin does not.)"""
    num_blocks, block_size, dk = cache.shape
    if latent.shape != (slot_mapping.shape[0], dk):
        raise ValueError(f"latent must be [T={slot_mapping.shape[0]}, {dk}], got {tuple(latent.shape)}")
    keep = slot_mapping >= 0
    cache.view(num_blocks * block_size, dk)[slot_mapping[keep].long()] = latent[keep].to(cache.dtype)


def gather_latent(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cache rows -> [length, Dk]."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    return cache[block_table_row.long()[pos // block_size], pos % block_size]


def _attend(q: torch.Tensor, rows: torch.Tensor, v_dim: int, scale: float, q_pos: torch.Tensor) -> torch.Tensor:
    """q [n, H, Dk], rows [L, Dk]; query i sees rows 0..q_pos[i]. float32+ math -> [n, H, v_dim] in q's dtype."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = rows.to(acc)  # [L, Dk]
    scores = torch.einsum("nhd,ld->nhl", q.to(acc), keys) * scale  # [n, H, L]
    visible = torch.arange(rows.shape[0], device=q.device)[None, :] <= q_pos[:, None]  # [n, L]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("nhl,ld->nhd", probs, keys[:, :v_dim]).to(q.dtype)


def mla_attention_reference(
    q: torch.Tensor,  # [T, H, Dk] absorbed queries (latent part, then RoPE part)
    cache: torch.Tensor,  # [num_blocks, block_size, Dk], this step's rows already written
    block_tables: torch.Tensor,  # [S, max_blocks]
    cu_seqlens_q: torch.Tensor,  # [S+1] new-token offsets into T
    context_lens: torch.Tensor,  # [S] cached + new
    v_dim: int,
    scale: float,
) -> torch.Tensor:  # [T, H, v_dim]
    num_seqs = cu_seqlens_q.numel() - 1
    check_mla_inputs(q, cache, block_tables, context_lens, num_seqs, v_dim)
    cu = cu_seqlens_q.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens_q must run from 0 to T={q.shape[0]}, got {cu[0]}..{cu[-1]}")
    out = q.new_empty(q.shape[0], q.shape[1], v_dim)
    for s, ctx in enumerate(context_lens.tolist()):
        q_len = cu[s + 1] - cu[s]
        if q_len < 0 or q_len > ctx:
            raise ValueError(f"sequence {s}: {q_len} new tokens but context_lens = {ctx}")
        if q_len == 0:
            continue
        rows = gather_latent(cache, block_tables[s], ctx)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        out[cu[s]:cu[s + 1]] = _attend(q[cu[s]:cu[s + 1]], rows, v_dim, scale, q_pos)
    return out


def mla_decode_reference(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                         v_dim: int, scale: float) -> torch.Tensor:
    """q [S, H, Dk], one new token per sequence -> [S, H, v_dim] (the loop above with q_len = 1)."""
    cu = torch.arange(q.shape[0] + 1, device=q.device)
    return mla_attention_reference(q, cache, block_tables, cu, context_lens, v_dim, scale)


def mla_decode_dense(
    q: torch.Tensor,  # [S, H, Dk]
    cache: torch.Tensor,  # [num_blocks, block_size, Dk]
    block_tables: torch.Tensor,  # [S, W] (padding entries may be anything, e.g. -1)
    context_lens: torch.Tensor,  # [S] >= 1, on q's device
    v_dim: int,
    scale: float,
) -> torch.Tensor:  # [S, H, v_dim]
    """Decode as batched matmuls over every sequence's whole block-table width, masked past its
    context: no host sync and static shapes, so CUDA graphs can capture it. The GPU alternative
    to the Triton decode kernel (scripts/bench_mla_decode.py measures both)."""
    num_seqs, _, dk = q.shape
    check_mla_inputs(q, cache, block_tables, context_lens, num_seqs, v_dim)
    block_size = cache.shape[1]
    width = block_tables.shape[1] * block_size
    offsets = torch.arange(block_size, device=q.device)
    slots = (block_tables.long().clamp_min(0)[:, :, None] * block_size + offsets).reshape(num_seqs, width)  # [S, L]
    rows = cache.view(-1, dk)[slots]  # [S, L, Dk]
    scores = torch.matmul(q, rows.transpose(1, 2)).float() * scale  # [S, H, L]
    visible = torch.arange(width, device=q.device)[None, :] < context_lens.long()[:, None]  # [S, L]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)  # [S, H, L]
    return torch.matmul(probs, rows[:, :, :v_dim])  # [S, H, v_dim]


def mla_prefill_expanded_reference(
    q_nope: torch.Tensor,  # [T, H, DN]
    q_rope: torch.Tensor,  # [T, H, DR]
    k_nope: torch.Tensor,  # [Lk, H, DN] decompressed keys (W_UK c)
    k_rope: torch.Tensor,  # [Lk, H or 1, DR]
    v: torch.Tensor,  # [Lk, H, DV] decompressed values (W_UV c)
    cu_seqlens_q: torch.Tensor,  # [S+1]
    cu_seqlens_k: torch.Tensor,  # [S+1]; sequence s's queries are the last q_len of its keys
    scale: float,
    **_,
) -> torch.Tensor:  # [T, H, DV] in q's dtype
    """Twin of mla_prefill_expanded.py: causal attention with per-head K/V, float32+ math."""
    acc = torch.float64 if q_nope.dtype == torch.float64 else torch.float32
    out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], v.shape[2])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        (q0, q1), (k0, k1) = (cq[s], cq[s + 1]), (ck[s], ck[s + 1])
        if q1 == q0:
            continue
        if q1 - q0 > k1 - k0:
            raise ValueError(f"sequence {s}: {q1 - q0} queries but {k1 - k0} keys")
        q = torch.cat((q_nope[q0:q1], q_rope[q0:q1]), dim=-1).to(acc)  # [q, H, Dqk]
        k = torch.cat((k_nope[k0:k1], k_rope[k0:k1].expand(-1, q.shape[1], -1)), dim=-1).to(acc)  # [ctx, H, Dqk]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(k1 - k0 - (q1 - q0), k1 - k0, device=q.device)
        visible = torch.arange(k1 - k0, device=q.device)[None, :] <= q_pos[:, None]  # [q, ctx]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v[k0:k1].to(acc)).to(out.dtype)
    return out
