"""The "triton" attention backend: one metadata object per step, built from the step's batch.

Decode steps (every sequence has one new token) run the paged decode kernel; anything else
(prefill, chunked prefill, mixed batches) runs the varlen prefill kernel, which handles a
cached prefix and q_len = 1 rows too. Both read K/V in place from the pages, after the new
tokens' K/V are written by the KV-write kernel. Nothing here waits for the GPU: the per-step
host lists (context lengths, query lengths) go up through pinned memory without a sync.

Layers with a sliding window fall back to the torch loop (the kernels have no window); the
graph runner refuses such models, so a captured graph never meets the fallback. MLA prefill
steps run either form (kernels.mla_prefill, chosen by the layer from `prefill_queries_per_key`):
`attend_latent` (absorbed queries over the latent cache) or `attend_latent_expanded` (the
context's latent rows gathered, decompressed by the layer, flash attention). KV pages that
are not a power of two get the torch backend's metadata for the step. This module imports the
kernels (hence triton): the attention registry imports it only for a model that chose it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from ..kernels.attention_decode import paged_decode_attention_triton, write_kv_cache_triton
from ..kernels.attention_prefill import prefill_attention_triton
from ..kernels.mla_attention import mla_decode_triton, mla_prefill_triton, write_latent_cache_triton
from ..kernels.mla_prefill_expanded import mla_prefill_expanded_triton
from .attention import PagedAttentionMetadata, StepBatch, attend_cached

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def to_device_int32(values: list[int], device: torch.device) -> torch.Tensor:
    """Host ints -> [n] int32 on `device` through pinned memory (no host sync, unlike a pageable copy)."""
    host = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def check_batch_lengths(batch: StepBatch, block_size: int) -> None:
    """The same checks as PagedAttentionMetadata.build, on host lists only."""
    if len(batch.query_lens) != len(batch.context_lens):
        raise ValueError(f"query_lens ({len(batch.query_lens)}) and context_lens ({len(batch.context_lens)}) differ in length")
    width = batch.block_tables.shape[1]
    for s, (q_len, ctx_len) in enumerate(zip(batch.query_lens, batch.context_lens)):
        if not 0 < q_len <= ctx_len:
            raise ValueError(f"sequence {s}: need 0 < query_len ({q_len}) <= context_len ({ctx_len})")
        if width * block_size < ctx_len:
            raise ValueError(f"sequence {s}: context_len {ctx_len} needs {-(-ctx_len // block_size)} KV blocks of "
                             f"{block_size}, but block_tables has {width} columns")
    if sum(batch.query_lens) != batch.num_tokens:
        raise ValueError(f"query_lens sum to {sum(batch.query_lens)} but the batch has {batch.num_tokens} tokens")


def queries_per_key(query_lens: list[int], context_lens: list[int]) -> float:
    """sum(q_len * ctx) / sum(ctx): how many new tokens a cached key serves on average, weighted
    by context (one whole prompt: its length; a short chunk over a long prefix: the chunk)."""
    keys = sum(context_lens)
    return sum(q * c for q, c in zip(query_lens, context_lens)) / keys if keys else 0.0


def context_slots(block_tables: torch.Tensor, context_lens: list[int], block_size: int) -> torch.Tensor:
    """[sum(ctx)] int64 cache slots of every sequence's positions 0..ctx-1, sequence after sequence.
    block_tables [S, W] on the device; the (sequence, position) lists go up from the host."""
    lens = torch.tensor(context_lens, dtype=torch.int64)
    seq = torch.repeat_interleave(torch.arange(len(context_lens)), lens)  # [Lk] host
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(int(lens.sum())) - starts[seq]  # [Lk] position within its sequence
    device = block_tables.device
    host = torch.stack((seq, pos)).to(torch.int32)  # [2, Lk]
    seq_d, pos_d = (host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host).long()
    return block_tables.long()[seq_d, pos_d // block_size] * block_size + pos_d % block_size


@dataclass
class KernelAttentionMetadata:
    name = "triton"
    slot_mapping: torch.Tensor  # [T] int64 cache slot of each new token (< 0: padding, not written)
    block_tables: torch.Tensor  # [S, W] int32
    context_lens: torch.Tensor  # [S] int32 on the device, cached + new tokens
    cu_seqlens_q: torch.Tensor | None  # [S+1] int32; None: a decode step (one new token per sequence)
    max_query_len: int
    batch: StepBatch | None = None  # kept for the sliding-window fallback (None under graphs)
    #: prefill steps: sum(q_len * ctx) / sum(ctx) and sum(ctx), what kernels.mla_prefill=auto reads
    #: (None: a decode step)
    prefill_queries_per_key: float | None = None
    prefill_keys: int | None = None
    _fallback: PagedAttentionMetadata | None = field(default=None, repr=False)
    _latent_context: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @staticmethod
    def supports(head_dim: int, block_size: int | None, dtype: torch.dtype) -> bool:
        """What the kernels handle: tl.dot needs head_dim >= 16; pages are a power of two
        (block_size None: not known yet, checked per step)."""
        pages_ok = block_size is None or (block_size > 0 and block_size & (block_size - 1) == 0)
        return head_dim >= 16 and pages_ok and dtype in KERNEL_DTYPES

    @classmethod
    def build(cls, batch: StepBatch, block_size: int) -> "KernelAttentionMetadata | PagedAttentionMetadata":
        if block_size <= 0 or block_size & (block_size - 1):
            return PagedAttentionMetadata.build(batch, block_size)
        check_batch_lengths(batch, block_size)
        device = batch.slot_mapping.device
        decode = all(q == 1 for q in batch.query_lens)
        cu = None
        if not decode:
            cu = batch.cu_seqlens_dev
            if cu is None:
                cu_host = [0]
                for q in batch.query_lens:
                    cu_host.append(cu_host[-1] + q)
                cu = to_device_int32(cu_host, device)
        ctx = batch.context_lens_dev
        if ctx is None:
            ctx = to_device_int32(list(batch.context_lens), device)
        return cls(slot_mapping=batch.slot_mapping, block_tables=batch.block_tables.to(torch.int32),
                   context_lens=ctx, cu_seqlens_q=cu,
                   max_query_len=max(batch.query_lens, default=0), batch=batch,
                   prefill_queries_per_key=None if decode else queries_per_key(batch.query_lens, batch.context_lens),
                   prefill_keys=None if decode else sum(batch.context_lens))

    @classmethod
    def for_decode(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor) -> "KernelAttentionMetadata":
        """Decode metadata over caller-owned device buffers (the graph runner's static inputs)."""
        return cls(slot_mapping=slot_mapping, block_tables=block_tables, context_lens=context_lens,
                   cu_seqlens_q=None, max_query_len=1)

    @staticmethod
    def decode_variant(model, num_seqs: int, max_context: int, block_size: int) -> Hashable:
        """What an eager decode step of num_seqs sequences compiles for, chosen from static shapes
        (batch, block-table width = max_context / block_size): NUM_SPLITS, or for the MLA
        head-block kernel its config and whether it splits. The warm-up runs one step per value."""
        from ..kernels import attention_decode, mla_attention

        spec = model.spec
        if spec.mla is not None and getattr(model.kernels, "mla_decode", "") == "triton_decode":
            from ..kernels.mla_decode import launch_plan

            mla = spec.mla
            cfg, splits, _ = launch_plan(num_seqs, spec.num_heads, mla.kv_lora_rank, mla.latent_dim, block_size,
                                         max_context // block_size, model.dtype, model.device)
            return cfg, splits > 1
        if spec.mla is not None:  # one token per sequence: ceil(heads / BLOCK_M) row blocks each
            block_m = mla_attention.default_blocks(model.dtype, spec.mla.kv_lora_rank)[0]
            programs = -(-spec.num_heads // block_m) * num_seqs
            return mla_attention.choose_num_splits(programs, max_context, mla_attention._num_sms(model.device))
        return attention_decode.choose_num_splits(num_seqs, spec.num_kv_heads, max_context,
                                                  attention_decode._num_sms(model.device))

    @property
    def is_decode(self) -> bool:
        return self.cu_seqlens_q is None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float, window: int | None = None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]; writes k/v into the cache first."""
        write_kv_cache_triton(k, v, k_cache, v_cache, self.slot_mapping)
        if window:
            return attend_cached(q, k_cache, v_cache, self._torch_metadata(k_cache.shape[1]), scale, window)
        if self.is_decode:
            return paged_decode_attention_triton(q, k_cache, v_cache, self.block_tables, self.context_lens, scale)
        return prefill_attention_triton(q, k_cache, v_cache, self.block_tables, self.cu_seqlens_q, self.context_lens,
                                        scale, max_query_len=self.max_query_len)

    def attend_latent(self, q: torch.Tensor, latent: torch.Tensor, cache: torch.Tensor, v_dim: int, scale: float,
                      decode: Callable | None = None) -> torch.Tensor:
        """MLA: q [T, H, Dk] absorbed queries, latent [T, Dk] rows -> [T, H, v_dim]; writes the rows
        first. Decode steps run `decode` (the layer's choice, kernels.mla_decode: the head-block
        decode kernel, the varlen kernel, or the batched matmuls of mla_reference.mla_decode_dense),
        others the varlen kernel."""
        write_latent_cache_triton(latent, cache, self.slot_mapping)
        if self.is_decode:
            return (decode or mla_decode_triton)(q, cache, self.block_tables, self.context_lens, v_dim, scale)
        return mla_prefill_triton(q, cache, self.block_tables, self.cu_seqlens_q, self.context_lens, v_dim, scale,
                                  max_query_len=self.max_query_len)

    def attend_latent_expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                               cache: torch.Tensor, decompress: Callable, scale: float) -> torch.Tensor:
        """MLA prefill in the expanded form: q_nope [T, H, DN], q_rope [T, H, DR] (not absorbed),
        latent [T, Dk] rows -> [T, H, DV]. Writes the rows, gathers every sequence's context rows
        [Lk, Dk] (the new rows themselves when no sequence has a cached prefix), and attends over
        decompress(rows) = (k_nope [Lk, H, DN], k_rope [Lk, 1, DR], v [Lk, H, DV])."""
        write_latent_cache_triton(latent, cache, self.slot_mapping)
        rows, cu_k = self._context_rows(latent, cache)
        k_nope, k_rope, v = decompress(rows)
        return mla_prefill_expanded_triton(q_nope, q_rope, k_nope, k_rope, v, self.cu_seqlens_q, cu_k, scale,
                                           max_query_len=self.max_query_len)

    def _context_rows(self, latent: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [Lk, Dk], cu_seqlens_k [S+1]): each sequence's latent rows 0..ctx-1, packed. The
        gather index is built once per step on the host (shared by every layer), no device sync."""
        if self._latent_context is None:
            q_lens, ctx_lens = self.batch.query_lens, self.batch.context_lens
            if list(q_lens) == list(ctx_lens):  # no cached prefix: the context is this step's rows
                self._latent_context = (None, self.cu_seqlens_q)
            else:
                self._latent_context = (context_slots(self.block_tables, ctx_lens, cache.shape[1]),
                                        to_device_int32([0, *itertools.accumulate(ctx_lens)], cache.device))
        slots, cu_k = self._latent_context
        if slots is None:
            return latent.to(cache.dtype), cu_k
        return cache.view(-1, cache.shape[2])[slots], cu_k

    def _torch_metadata(self, block_size: int) -> PagedAttentionMetadata:
        if self.batch is None:
            raise RuntimeError("a sliding-window layer needs the step's batch (not available inside a CUDA graph)")
        if self._fallback is None:
            self._fallback = PagedAttentionMetadata.build(self.batch, block_size)
        return self._fallback
