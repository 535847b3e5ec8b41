"""Decode steps as CUDA graphs: captured once per batch-size bucket, replayed every step.

A decode step of B sequences is padded up to the smallest bucket >= B (1, 2, 4, ..., 256 by
default) and runs as one graph replay instead of ~40 kernel launches per layer. Everything
the step reads lives in static device buffers that `run` refills before each replay:

  input_ids, positions, slot_mapping [Bmax]   padding: token 0, position 0, slot -1 (no KV write)
  block_tables [Bmax, W], context_lens [Bmax] padding: block 0, length 1 (a valid, ignored read)
  valid_rows [Bmax] bool                      padding rows stay out of the expert-load counters
  token_offset 0-d int64                      the routing policy reads it at replay time

The routing policy and the load counters run inside the graph (both are sync-free and keep
their tensors in place). Padding rows come after every real row, so policies that walk
tokens in order (greedy_balanced) assign the real rows exactly as an unpadded step would.

Where graphs are not used (`GraphsUnsupported` says why): ep_size > 1 (the all-to-all needs
split sizes on the host; the EP path stays eager), sliding-window layers (no kernel), and
anything without the Triton attention backend. Prefill stays eager: one large step per
prompt batch, already launch-bound only for tiny prompts.

`capture=False` keeps the static-buffer machinery but runs it eagerly (CPU tests under the
Triton interpreter exercise the padding and bucketing logic that way).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from ...layers.attention import attention_backend
from ...layers.attention_triton import KernelAttentionMetadata
from ..forward_batch import ForwardBatch

log = logging.getLogger(__name__)
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class GraphsUnsupported(RuntimeError):
    """This model/device cannot run decode as CUDA graphs; the message says why."""


def bucket_sizes(max_batch: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> list[int]:
    """Buckets below max_batch, then max_batch itself: every batch 1..max_batch has a home."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return sorted({b for b in buckets if 0 < b < max_batch} | {max_batch})


def check_graphable(model, block_size: int) -> None:
    """Raise GraphsUnsupported unless decode of `model` can be captured."""
    spec = model.spec
    if model.ep_size != 1:
        raise GraphsUnsupported(f"ep_size={model.ep_size}: the all-to-all needs host-side split sizes (EP decode stays eager)")
    if getattr(model.runtime, "replicas", None) is not None:
        raise GraphsUnsupported("EPLB replica maps are rebuilt by rebalances; decode stays eager")
    if not model.runtime.policy.graph_safe:
        raise GraphsUnsupported(f"routing policy {model.runtime.policy.name!r} works host-side (not graph-safe)")
    if any(spec.sliding_windows):
        raise GraphsUnsupported("sliding-window attention has no kernel path (torch fallback needs host lists)")
    probe = ForwardBatch.empty(model.device)
    if attention_backend(probe, spec.head_dim, block_size, model.dtype) is not KernelAttentionMetadata:
        raise GraphsUnsupported(f"attention on {model.device} does not use the Triton kernels "
                                f"(head_dim={spec.head_dim}, block_size={block_size}, dtype={model.dtype})")


class DecodeGraphRunner:
    """Bucketed decode graphs for one model and its KV cache (one EP rank, ep_size 1)."""

    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], *, max_batch: int,
                 max_blocks_per_seq: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS, capture: bool = True) -> None:
        block_size = kv_caches[0][0].shape[1]
        check_graphable(model, block_size)
        if capture and model.device.type != "cuda":
            raise GraphsUnsupported(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        self.model, self.kv_caches = model, kv_caches
        self.buckets = bucket_sizes(max_batch, buckets)
        self.max_batch = self.buckets[-1]
        self.width = max_blocks_per_seq
        self.capture_enabled = capture
        self.policy = model.runtime.policy  # the policy baked into the graphs
        dev = model.device
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.valid_rows = torch.zeros(n, dtype=torch.bool, device=dev)
        self.token_offset = torch.zeros((), dtype=torch.int64, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # bucket -> [b, V] logits written by its graph
        self._steps: dict[int, Callable[[], torch.Tensor]] = {b: self._step_fn(b) for b in self.buckets}
        self.capture_seconds = 0.0
        if capture:
            self._capture_all()

    # ---- capture ----
    def _step_fn(self, b: int) -> Callable[[], torch.Tensor]:
        meta = KernelAttentionMetadata.for_decode(self.slot_mapping[:b], self.block_tables[:b], self.context_lens[:b])

        def step() -> torch.Tensor:
            return self.model.forward_tokens(self.input_ids[:b], self.positions[:b], meta, self.kv_caches,
                                             self.logits_indices[:b], self.token_offset, self.valid_rows[:b])
        return step

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Warm each bucket up eagerly (Triton compiles, policy caches fill; all rows are padding,
        so nothing is written to the KV cache or counted), then capture, largest bucket first so
        the smaller graphs reuse its memory pool."""
        start = time.perf_counter()
        self._reset_padding(0, self.max_batch)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self.model.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                self._steps[b]()  # warm-up on a side stream, as torch.cuda.graph expects
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize(self.model.device)
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[b] = self._steps[b]()
            self._graphs[b] = graph
        torch.cuda.synchronize(self.model.device)
        self.capture_seconds = time.perf_counter() - start
        log.info("captured decode CUDA graphs for batch buckets %s in %.1f s", self.buckets, self.capture_seconds)

    # ---- replay ----
    def bucket_for(self, num_seqs: int) -> int | None:
        for b in self.buckets:
            if b >= num_seqs:
                return b
        return None

    def can_run(self, batch: ForwardBatch) -> bool:
        """A pure decode step that fits a bucket and the block-table width, with the policy captured."""
        return (0 < batch.num_seqs <= self.max_batch and batch.num_tokens == batch.num_seqs
                and all(q == 1 for q in batch.query_lens) and batch.block_tables.shape[1] <= self.width
                and self.model.runtime.policy is self.policy)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """-> [S, V] float32 logits, a view of the graph's output buffer: valid until the next run."""
        if not self.can_run(batch):
            raise ValueError(f"decode graphs cannot run this batch (seqs={batch.num_seqs}, tokens={batch.num_tokens}, "
                             f"block-table width {batch.block_tables.shape[1]} vs {self.width}, "
                             f"policy {'unchanged' if self.model.runtime.policy is self.policy else 'changed since capture'})")
        s = batch.num_seqs
        b = self.bucket_for(s)
        for ctx in batch.context_lens:
            if not 1 <= ctx <= self.width * self.block_size:
                raise ValueError(f"context_len {ctx} outside [1, {self.width * self.block_size}] (block-table width {self.width})")
        self.input_ids[:s].copy_(batch.input_ids, non_blocking=True)
        self.positions[:s].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:s].copy_(batch.slot_mapping, non_blocking=True)
        self.block_tables[:s, :batch.block_tables.shape[1]].copy_(batch.block_tables, non_blocking=True)
        ctx_host = torch.tensor(batch.context_lens, dtype=torch.int32)
        if self.context_lens.is_cuda:
            ctx_host = ctx_host.pin_memory()
        self.context_lens[:s].copy_(ctx_host, non_blocking=True)
        self.valid_rows[:s].fill_(True)
        self._reset_padding(s, b)
        if isinstance(batch.token_offset, torch.Tensor):
            self.token_offset.copy_(batch.token_offset, non_blocking=True)
        else:
            self.token_offset.fill_(int(batch.token_offset))
        if self.capture_enabled:
            self._graphs[b].replay()
            out = self._outputs[b]
        else:
            out = self._steps[b]()
        return out[:s]

    @property
    def block_size(self) -> int:
        return self.kv_caches[0][0].shape[1]

    def _reset_padding(self, start: int, end: int) -> None:
        """Rows start..end-1 become padding (see the module docstring)."""
        if start >= end:
            return
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.slot_mapping[start:end].fill_(-1)
        self.block_tables[start:end, 0].zero_()
        self.context_lens[start:end].fill_(1)
        self.valid_rows[start:end].fill_(False)


def maybe_decode_graphs(model, kv_caches, *, max_batch: int, max_blocks_per_seq: int,
                        buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> DecodeGraphRunner | None:
    """Decode graphs where they apply (CUDA, ep_size 1, kernel attention), else None with the
    reason logged. Set EPSERVE_CUDA_GRAPHS=0 to keep decode eager."""
    import os

    if os.environ.get("EPSERVE_CUDA_GRAPHS", "1") == "0":
        log.info("decode CUDA graphs off (EPSERVE_CUDA_GRAPHS=0)")
        return None
    if model.device.type != "cuda":
        return None
    try:
        return DecodeGraphRunner(model, kv_caches, max_batch=max_batch, max_blocks_per_seq=max_blocks_per_seq,
                                 buckets=buckets)
    except GraphsUnsupported as exc:
        log.info("decode stays eager: %s", exc)
        return None
