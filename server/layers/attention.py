"""Paged attention: per-step metadata, the KV-cache write and the attention itself.

KV cache per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim] (MLA:
one latent cache [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim], `attend_latent`). A
sequence's token j lives at slot block_tables[s, j // block_size] * block_size + j % block_size.
Each step writes the new tokens' K/V at `slot_mapping`, then every sequence attends over its
whole context: the new tokens are the last `query_len` of `context_len`, causal among
themselves and over everything cached before them (prefill, chunked prefill and decode alike).

Backends (ATTENTION_BACKENDS), one chosen per model when it is built (`attention_backend_for`
its kernel backend, head_dim and dtype): each step the model builds that backend's metadata
object, and `meta.attend(...)` runs the step.
  torch   PagedAttentionMetadata (here): sequences looped over on the host; CPU and tests.
  triton  KernelAttentionMetadata (attention_triton.py): the paged decode kernel when
          every sequence decodes one token, the varlen prefill kernel otherwise; no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..kernels.backend import KernelBackend
from ..registry import Registry


class StepBatch(Protocol):
    """What attention reads of one step's batch (server/model/forward_batch.py's ForwardBatch)."""

    query_lens: list[int]  # [S] new tokens per sequence
    context_lens: list[int]  # [S] cached + new tokens
    block_tables: torch.Tensor  # [S, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64
    context_lens_dev: torch.Tensor | None  # [S] int32 context_lens already on the device, or None
    cu_seqlens_dev: torch.Tensor | None  # [S+1] int32 prefix sums of query_lens on the device, or None

    @property
    def num_tokens(self) -> int: ...


@dataclass
class SeqSlice:
    q_start: int  # first row of this sequence's new tokens in the step's [T] rows
    q_len: int
    ctx_len: int
    kv_slots: torch.Tensor  # [ctx_len] int64 flat cache slots of tokens 0..ctx_len-1


@dataclass
class PagedAttentionMetadata:
    """Per-step bookkeeping shared by every layer (built once per forward): the "torch" backend."""

    name = "torch"
    prefill_queries_per_key = prefill_keys = None  # MLA prefill always runs the loop below (no expanded form)
    seqs: list[SeqSlice]
    slot_mapping: torch.Tensor  # [T] int64
    _masks: dict = field(default_factory=dict)  # (seq index, window) -> [q_len, ctx_len] bool

    @staticmethod
    def supports(head_dim: int, block_size: int | None, dtype: torch.dtype) -> bool:
        return True

    @classmethod
    def build(cls, batch: StepBatch, block_size: int) -> "PagedAttentionMetadata":
        if len(batch.query_lens) != len(batch.context_lens):
            raise ValueError(f"query_lens ({len(batch.query_lens)}) and context_lens ({len(batch.context_lens)}) differ in length")
        seqs, start = [], 0
        device = batch.slot_mapping.device
        offsets = torch.arange(block_size, device=device, dtype=torch.int64)  # [B]
        for s, (q_len, ctx_len) in enumerate(zip(batch.query_lens, batch.context_lens)):
            if not 0 < q_len <= ctx_len:
                raise ValueError(f"sequence {s}: need 0 < query_len ({q_len}) <= context_len ({ctx_len})")
            n_blocks = -(-ctx_len // block_size)
            if batch.block_tables.shape[1] < n_blocks:
                raise ValueError(f"sequence {s}: context_len {ctx_len} needs {n_blocks} KV blocks of {block_size}, "
                                 f"but block_tables has {batch.block_tables.shape[1]} columns")
            blocks = batch.block_tables[s, :n_blocks].to(torch.int64)  # [n_blocks]
            slots = (blocks[:, None] * block_size + offsets[None, :]).reshape(-1)[:ctx_len]  # [ctx]
            seqs.append(SeqSlice(start, q_len, ctx_len, slots))
            start += q_len
        if start != batch.num_tokens:
            raise ValueError(f"query_lens sum to {start} but the batch has {batch.num_tokens} tokens")
        return cls(seqs, batch.slot_mapping)

    def mask(self, index: int, window: int | None) -> torch.Tensor:
        """[q_len, ctx_len] bool, True where query i may attend to key j (transformers' rule:
        j <= i, and with a sliding window also j > i - window, in sequence positions)."""
        key = (index, window)
        m = self._masks.get(key)
        if m is None:
            seq = self.seqs[index]
            device = seq.kv_slots.device
            q_pos = torch.arange(seq.ctx_len - seq.q_len, seq.ctx_len, device=device)  # [q]
            k_pos = torch.arange(seq.ctx_len, device=device)  # [ctx]
            m = k_pos[None, :] <= q_pos[:, None]
            if window:
                m &= k_pos[None, :] > q_pos[:, None] - window
            self._masks[key] = m
        return m

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float, window: int | None = None) -> torch.Tensor:
        """Write this step's K/V [T, Hkv, D] into the cache, then attend. q [T, Hq, D] -> [T, Hq, D]."""
        write_kv(k, v, k_cache, v_cache, self.slot_mapping)
        return attend_cached(q, k_cache, v_cache, self, scale, window)

    def attend_latent(self, q: torch.Tensor, latent: torch.Tensor, cache: torch.Tensor, v_dim: int, scale: float,
                      decode=None) -> torch.Tensor:
        """MLA: write this step's latent rows [T, Dk] into the cache, then attend with absorbed
        queries q [T, H, Dk] over every cached row -> [T, H, v_dim] (the rows' first v_dim values).
        `decode` is the kernel backend's decode choice; this loop serves every step."""
        dk = cache.shape[-1]
        flat = cache.view(-1, dk)  # [NB*B, Dk]
        slots, rows = written_rows(self.slot_mapping, latent)
        flat[slots] = rows
        out = q.new_empty(q.shape[0], q.shape[1], v_dim)
        for i, seq in enumerate(self.seqs):
            qs = q[seq.q_start:seq.q_start + seq.q_len]  # [q, H, Dk]
            rows = flat[seq.kv_slots]  # [ctx, Dk]
            scores = torch.matmul(qs, rows.t()) * scale  # [q, H, ctx]
            scores = scores.masked_fill(~self.mask(i, None)[:, None, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out[seq.q_start:seq.q_start + seq.q_len] = torch.matmul(probs, rows[:, :v_dim])  # [q, H, v_dim]
        return out


def written_rows(slot_mapping: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(slots, *rows) without the padding rows (slot < 0), which the kernels skip too: a
    negative index would otherwise write the cache's last slot. One host check per call."""
    keep = slot_mapping >= 0  # [T] bool
    if bool(keep.all()):
        return (slot_mapping, *rows)
    return (slot_mapping[keep], *(r[keep] for r in rows))


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v [T, Hkv, D] -> cache slots `slot_mapping` [T]; slots < 0 (padding) are not written."""
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    slots, k, v = written_rows(slot_mapping, k, v)
    k_cache.view(-1, hkv, d)[slots] = k
    v_cache.view(-1, hkv, d)[slots] = v


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D] (RoPE applied)
    k: torch.Tensor,  # [T, Hkv, D] (RoPE applied)
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [NB, B, Hkv, D]
    v_cache: torch.Tensor,  # [NB, B, Hkv, D]
    meta,  # PagedAttentionMetadata | KernelAttentionMetadata (the model's attention_backend.build)
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend with the backend that built `meta`.
    Returns [T, Hq, D]."""
    return meta.attend(q, k, v, k_cache, v_cache, scale, window)


def attend_cached(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [NB, B, Hkv, D], this step's K/V already written
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """The torch attention loop over sequences (no cache write). Returns [T, Hq, D]."""
    num_heads, hkv, d = q.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = num_heads // hkv
    flat_k = k_cache.view(-1, hkv, d)
    flat_v = v_cache.view(-1, hkv, d)
    out = torch.empty_like(q)
    for i, seq in enumerate(meta.seqs):
        qs = q[seq.q_start:seq.q_start + seq.q_len]  # [q, Hq, D]
        qs = qs.view(seq.q_len, hkv, group, d).permute(1, 2, 0, 3)  # [Hkv, G, q, D]
        ks = flat_k[seq.kv_slots].permute(1, 0, 2)[:, None]  # [Hkv, 1, ctx, D]
        vs = flat_v[seq.kv_slots].permute(1, 0, 2)[:, None]  # [Hkv, 1, ctx, D]
        scores = torch.matmul(qs, ks.transpose(-1, -2)) * scale  # [Hkv, G, q, ctx]
        scores = scores.masked_fill(~meta.mask(i, window), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [Hkv, G, q, ctx]
        o = torch.matmul(probs, vs)  # [Hkv, G, q, D]
        out[seq.q_start:seq.q_start + seq.q_len] = o.permute(2, 0, 1, 3).reshape(seq.q_len, num_heads, d)
    return out


# ---- backend registry ----
#: kernel backend name -> metadata class with .build(batch, block_size) (and .supports(head_dim, block_size, dtype))
ATTENTION_BACKENDS: Registry[type] = Registry("attention backend", lazy=True)
ATTENTION_BACKENDS.register("torch", "server.layers.attention:PagedAttentionMetadata")
ATTENTION_BACKENDS.register("triton", "server.layers.attention_triton:KernelAttentionMetadata")


def attention_backend_for(kernels: KernelBackend, head_dim: int, dtype: torch.dtype) -> type:
    """The metadata class a model uses in every step: its kernel backend's (torch where that has
    none, e.g. grouped_mm, which only replaces MoE ops), unless the kernels cannot take this
    head_dim or dtype. EPSERVE_KERNEL_BACKEND=torch therefore forces the torch loop."""
    cls = ATTENTION_BACKENDS[kernels.name if kernels.name in ATTENTION_BACKENDS else "torch"]
    return cls if cls.supports(head_dim, None, dtype) else PagedAttentionMetadata
