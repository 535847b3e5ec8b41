"""Torch twins of the paged attention kernels: CPU path, oracle, and GPU baselines.

Paged KV layout (per layer): k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim];
sequence s keeps token position p in block block_tables[s, p // block_size] at offset
p % block_size. context_lens[s] counts the tokens in the cache for s *including* this step's
new tokens: callers write the new K/V first (write_kv_cache), then run attention.

Prefill semantics (bottom-right causal): sequence s has q_len new tokens at positions
ctx - q_len .. ctx - 1; the new token at position p attends to cache positions 0..p. With
q_len = 1 this is decode, so the prefill path also serves mixed batches.
GQA: query head h reads kv head h // (num_q_heads // num_kv_heads).
"""
from __future__ import annotations

import math

import torch


def check_paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor, num_seqs: int) -> tuple[int, int]:
    """Validate shapes; returns (num_kv_heads, group size)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, kv_heads, head_dim], got "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q must be [tokens, q_heads, head_dim={k_cache.shape[3]}], got {tuple(q.shape)}")
    num_kv_heads = k_cache.shape[2]
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({num_kv_heads})")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [num_seqs={num_seqs}, max_blocks], got {tuple(block_tables.shape)}")
    if context_lens.dim() != 1 or context_lens.shape[0] != num_seqs:
        raise ValueError(f"context_lens must be [num_seqs={num_seqs}], got {tuple(context_lens.shape)}")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    return num_kv_heads, q.shape[1] // num_kv_heads


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v [T, kv_heads, D] -> cache slots slot_mapping [T] (= block * block_size + offset).

    Slots < 0 are skipped (padding tokens). Torch twin of attention_decode.write_kv_cache_triton
    (boolean indexing here syncs on GPU, which the Triton version avoids).
    """
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    if k.shape != (slot_mapping.shape[0], kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k/v must be [T={slot_mapping.shape[0]}, {kv_heads}, {head_dim}], got "
                         f"{tuple(k.shape)} / {tuple(v.shape)}")
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(num_blocks * block_size, kv_heads, head_dim)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, kv_heads, head_dim)[slots] = v[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """[num_blocks, block_size, kv_heads, D] + one sequence's blocks -> [length, kv_heads, D]."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_table_row.long()[pos // block_size]
    return cache[blocks, pos % block_size]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_pos: torch.Tensor) -> torch.Tensor:
    """q [n, Hq, D], k/v [L, Hkv, D]; query i sees keys 0..q_pos[i]. Float32+ math, returns q's dtype."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    kk = k.to(acc).repeat_interleave(group, dim=1)  # [L, Hq, D]
    vv = v.to(acc).repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.to(acc), kk) * scale  # [Hq, n, L]
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]  # [n, L]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hnl,lhd->nhd", probs, vv).to(q.dtype)  # [n, Hq, D]


def paged_decode_attention_reference(
    q: torch.Tensor,  # [S, Hq, D], one new token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks]
    context_lens: torch.Tensor,  # [S] >= 1, including the new token
    scale: float | None = None,
) -> torch.Tensor:  # [S, Hq, D]
    check_paged_inputs(q, k_cache, v_cache, block_tables, context_lens, q.shape[0])
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    out = torch.empty_like(q)
    for s, ctx in enumerate(context_lens.tolist()):
        if ctx < 1:
            raise ValueError(f"context_lens[{s}] = {ctx}: decode needs at least the new token in the cache")
        k = gather_kv(k_cache, block_tables[s], ctx)
        v = gather_kv(v_cache, block_tables[s], ctx)
        out[s : s + 1] = _attend(q[s : s + 1], k, v, scale, torch.tensor([ctx - 1], device=q.device))
    return out


def prefill_attention_reference(
    q: torch.Tensor,  # [T, Hq, D], new tokens of all sequences concatenated
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks]
    cu_seqlens_q: torch.Tensor,  # [S+1] new-token offsets into T
    context_lens: torch.Tensor,  # [S] cached + new tokens
    scale: float | None = None,
) -> torch.Tensor:  # [T, Hq, D]
    num_seqs = cu_seqlens_q.numel() - 1
    check_paged_inputs(q, k_cache, v_cache, block_tables, context_lens, num_seqs)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    cu = cu_seqlens_q.tolist()
    if cu[0] != 0 or cu[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens_q must run from 0 to T={q.shape[0]}, got {cu[0]}..{cu[-1]}")
    out = torch.empty_like(q)
    for s, ctx in enumerate(context_lens.tolist()):
        q_len = cu[s + 1] - cu[s]
        if q_len < 0 or q_len > ctx:
            raise ValueError(f"sequence {s}: {q_len} new tokens but context_lens = {ctx}")
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[s], ctx)
        v = gather_kv(v_cache, block_tables[s], ctx)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        out[cu[s] : cu[s + 1]] = _attend(q[cu[s] : cu[s + 1]], k, v, scale, q_pos)
    return out
