"""Decode steps as CUDA graphs: captured once per batch-size bucket, replayed every step.

A decode step of B sequences is padded up to the smallest bucket >= B (1, 2, 4, ..., 256 by
default) and runs as one graph replay instead of ~40 kernel launches per layer. Everything
the step reads lives in static device buffers (GraphInputs), refilled before each replay:

  pool [P], gather [Bmax] int64               input ids = pool[gather] (the gather is captured)
  positions, slot_mapping [Bmax]              padding: position 0, slot -1 (no KV write)
  block_tables [Bmax, W], context_lens [Bmax] padding: block 0, length 1 (a valid, ignored read)
  valid_rows [Bmax] bool                      padding rows stay out of the expert-load counters
  token_offset 0-d int64                      the routing policy reads it at replay time
  logits_indices [Bmax] int64                 0..Bmax-1 (reset before every capture: the engine's
                                              buffer still holds the last prefill's row ends)

The engine passes views of its own step buffers (server/worker/input_buffers.py): it fills
them with its one host-to-device copy per step, where the pool holds each slot's last sampled
token, so a decode step's input ids never leave the device, and calls `replay`. Used alone
(tests, the benchmark), the runner owns its buffers and `run(batch)` fills them from a
ForwardBatch.

The routing policy, the EPLB replica choice and the load counters run inside the graph (all
are sync-free and keep their tensors in place). Padding rows come after every real row, so
policies that walk tokens in order (greedy_balanced) assign the real rows exactly as an
unpadded step would.

EP (ep_size > 1, or the fixed-capacity dispatcher forced at ep_size 1): each MoE layer's two
collectives (all-gather, all-to-all; server/moe/dispatch/all_gather.py) are captured with it.
Every rank captures the same buckets in the same order, and every step every rank replays the
same bucket (`replay(num_seqs, bucket)`, `run(batch, bucket)`: the step plan carries the
largest rank's batch), an idle rank with all rows padding. The warm-up runs each bucket's collectives
eagerly first, so the communicator exists before capture, as NCCL requires; capture uses
thread-local mode so the process group's watchdog thread cannot invalidate it.

Where graphs are not used (`GraphsUnsupported` says why): a dispatcher that needs host-side
split sizes (alltoall), sliding-window layers (no kernel), and anything without the Triton
attention backend. Prefill stays eager: one large step per prompt batch, already
launch-bound only for tiny prompts.

`capture=False` keeps the static-buffer machinery but runs it eagerly (CPU tests under the
Triton interpreter exercise the padding and bucketing logic that way).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

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


def check_graphable(model, block_size: int, max_batch: int) -> None:
    """Raise GraphsUnsupported unless decode of `model` can be captured."""
    spec = model.spec
    dispatcher = model.dispatcher
    if not dispatcher.graph_safe(max_batch):
        raise GraphsUnsupported(f"ep_size={model.ep_size}, parallel.dispatch={dispatcher.name}: decode steps of up to "
                                f"{max_batch} rows need host-side split sizes (EP decode stays eager)")
    if not model.runtime.policy.graph_safe:
        raise GraphsUnsupported(f"routing policy {model.runtime.policy.name!r} works host-side (not graph-safe)")
    if any(spec.sliding_windows):
        raise GraphsUnsupported("sliding-window attention has no kernel path (torch fallback needs host lists)")
    backend = model.attention_backend  # chosen when the model was built
    if backend.name != "triton" or not backend.supports(model.attention_width, block_size, model.dtype):
        raise GraphsUnsupported(f"attention on {model.device} does not use the Triton kernels "
                                f"(head width {model.attention_width}, block_size={block_size}, dtype={model.dtype})")


@dataclass(frozen=True)
class GraphInputs:
    """The device buffers decode graphs read, by address (see the module docstring)."""

    pool: torch.Tensor  # [P] int64 token ids the gather reads from
    gather: torch.Tensor  # [Bmax] int64 index into pool of each row's input token
    positions: torch.Tensor  # [Bmax] int64
    slot_mapping: torch.Tensor  # [Bmax] int64
    block_tables: torch.Tensor  # [Bmax, W] int32
    context_lens: torch.Tensor  # [Bmax] int32
    valid_rows: torch.Tensor  # [Bmax] bool
    token_offset: torch.Tensor  # 0-d int64
    logits_indices: torch.Tensor  # [Bmax] int64

    @classmethod
    def allocate(cls, max_batch: int, width: int, device: torch.device | str) -> "GraphInputs":
        """Buffers of its own for a runner used alone: pool row i is row i's token."""
        def i64(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int64, device=device)

        return cls(pool=i64(max_batch), gather=torch.arange(max_batch, dtype=torch.int64, device=device),
                   positions=i64(max_batch), slot_mapping=torch.full((max_batch,), -1, dtype=torch.int64, device=device),
                   block_tables=torch.zeros(max_batch, width, dtype=torch.int32, device=device),
                   context_lens=torch.ones(max_batch, dtype=torch.int32, device=device),
                   valid_rows=torch.zeros(max_batch, dtype=torch.bool, device=device),
                   token_offset=torch.zeros((), dtype=torch.int64, device=device),
                   logits_indices=torch.arange(max_batch, dtype=torch.int64, device=device))


class DecodeGraphRunner:
    """Bucketed decode graphs for one model and its KV cache (one EP rank)."""

    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], *, max_batch: int,
                 max_blocks_per_seq: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS, capture: bool = True,
                 inputs: GraphInputs | None = None) -> None:
        block_size = kv_caches[0][0].shape[1]
        self.buckets = bucket_sizes(max_batch, buckets)
        check_graphable(model, block_size, self.buckets[-1])
        if capture and model.device.type != "cuda":
            raise GraphsUnsupported(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        self.model, self.kv_caches = model, kv_caches
        #: every rank must replay the same bucket in the same step (the graphs hold collectives)
        self.lockstep = model.dispatcher.collective
        self.max_batch = self.buckets[-1]
        self.width = max_blocks_per_seq
        self.capture_enabled = capture
        self.policy = model.runtime.policy  # the policy baked into the graphs
        self._owns_inputs = inputs is None
        if inputs is None:
            inputs = GraphInputs.allocate(self.max_batch, max_blocks_per_seq, model.device)
        if inputs.gather.shape[0] < self.max_batch or inputs.block_tables.shape[1] != max_blocks_per_seq:
            raise ValueError(f"graph inputs hold {inputs.gather.shape[0]} rows x {inputs.block_tables.shape[1]} blocks; "
                             f"need {self.max_batch} x {max_blocks_per_seq}")
        self.inputs = inputs
        self.positions, self.slot_mapping = inputs.positions, inputs.slot_mapping
        self.block_tables, self.context_lens = inputs.block_tables, inputs.context_lens
        self.valid_rows, self.token_offset = inputs.valid_rows, inputs.token_offset
        self.logits_indices = inputs.logits_indices
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # bucket -> [b, V] logits written by its graph
        self._steps: dict[int, Callable[[], torch.Tensor]] = {b: self._step_fn(b) for b in self.buckets}
        self.capture_seconds = 0.0
        if capture:
            self._capture_all()

    # ---- capture ----
    def _step_fn(self, b: int) -> Callable[[], torch.Tensor]:
        meta = self.model.attention_backend.for_decode(self.slot_mapping[:b], self.block_tables[:b],
                                                       self.context_lens[:b])  # KernelAttentionMetadata

        pool, gather = self.inputs.pool, self.inputs.gather[:b]

        def step() -> torch.Tensor:
            input_ids = pool.index_select(0, gather)  # [b]
            return self.model.forward_tokens(input_ids, self.positions[:b], meta, self.kv_caches,
                                             self.logits_indices[:b], self.token_offset, self.valid_rows[:b],
                                             ep_rows=b)
        return step

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Warm each bucket up eagerly (Triton compiles, policy caches fill; all rows are padding,
        so nothing is written to the KV cache or counted), then capture, largest bucket first so
        the smaller graphs reuse its memory pool."""
        start = time.perf_counter()
        self._reset_padding(0, self.max_batch)
        # Row i samples from row i. Over the engine's step buffers a (re)capture right after a
        # prefill would read that step's logits indices (prompt row ends, past the bucket): out
        # of bounds. Replays need no reset: the engine writes 0..bucket-1 before each.
        torch.arange(self.max_batch, out=self.logits_indices[:self.max_batch])
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self.model.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.buckets):
                self._steps[b]()  # warm-up on a side stream, as torch.cuda.graph expects
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize(self.model.device)
        mode = "thread_local" if self.lockstep else "global"
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
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

    def can_run(self, batch: ForwardBatch, bucket: int | None = None) -> bool:
        """A pure decode step that fits a bucket (`bucket`, or the smallest that holds it) and the
        block-table width, with the policy captured. With an explicit bucket (EP lockstep) the
        batch may be empty: an idle rank replays all-padding rows."""
        if bucket is not None and bucket not in self._steps:
            return False
        low = 0 if bucket is not None else 1
        return (low <= batch.num_seqs <= (bucket or self.max_batch) and batch.num_tokens == batch.num_seqs
                and all(q == 1 for q in batch.query_lens) and batch.block_tables.shape[1] <= self.width
                and self.model.runtime.policy is self.policy)

    def can_replay(self, num_seqs: int, bucket: int | None = None) -> bool:
        """A decode step of `num_seqs` rows fits a bucket (`bucket`, or the smallest that holds it)
        and the captured policy is still in place. With an explicit bucket (EP lockstep) the
        step may have no rows: an idle rank replays padding only."""
        if bucket is not None:
            return bucket in self._steps and 0 <= num_seqs <= bucket and self.model.runtime.policy is self.policy
        return 0 < num_seqs <= self.max_batch and self.model.runtime.policy is self.policy

    @torch.inference_mode()
    def replay(self, num_seqs: int, bucket: int | None = None) -> torch.Tensor:
        """Run the bucket of `num_seqs` (or `bucket`: EP ranks all replay the same one) on inputs
        the caller already put in place (rows up to the bucket, padding included).
        -> [S, V] float32, a view valid until the next replay."""
        b = bucket if bucket is not None else self.bucket_for(num_seqs)
        if self.capture_enabled:
            self._graphs[b].replay()
            return self._outputs[b][:num_seqs]
        return self._steps[b]()[:num_seqs]

    @torch.inference_mode()
    def run(self, batch: ForwardBatch, bucket: int | None = None) -> torch.Tensor:
        """-> [S, V] float32 logits, a view of the graph's output buffer: valid until the next run.
        `bucket`: the graph to replay (EP: the same on every rank this step); None: the smallest
        that holds the batch."""
        if not self._owns_inputs:
            raise RuntimeError("this runner reads the engine's step buffers: fill them and call replay()")
        if not self.can_run(batch, bucket):
            raise ValueError(f"decode graphs cannot run this batch (seqs={batch.num_seqs}, tokens={batch.num_tokens}, "
                             f"bucket {bucket} of {self.buckets}, "
                             f"block-table width {batch.block_tables.shape[1]} vs {self.width}, "
                             f"policy {'unchanged' if self.model.runtime.policy is self.policy else 'changed since capture'})")
        s = batch.num_seqs
        b = bucket if bucket is not None else self.bucket_for(s)
        for ctx in batch.context_lens:
            if not 1 <= ctx <= self.width * self.block_size:
                raise ValueError(f"context_len {ctx} outside [1, {self.width * self.block_size}] (block-table width {self.width})")
        if s:
            self.inputs.pool[:s].copy_(batch.input_ids, non_blocking=True)
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
        return self.replay(s, b)

    @property
    def block_size(self) -> int:
        return self.kv_caches[0][0].shape[1]

    def _reset_padding(self, start: int, end: int) -> None:
        """Rows start..end-1 become padding (see the module docstring)."""
        if start >= end:
            return
        if self._owns_inputs:
            self.inputs.pool[start:end].zero_()
        else:
            self.inputs.gather[start:end].zero_()  # the pool's first entry: some valid token id
        self.positions[start:end].zero_()
        self.slot_mapping[start:end].fill_(-1)
        self.block_tables[start:end, 0].zero_()
        self.context_lens[start:end].fill_(1)
        self.valid_rows[start:end].fill_(False)


def maybe_decode_graphs(model, kv_caches, *, max_batch: int, max_blocks_per_seq: int,
                        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                        inputs: GraphInputs | None = None, enabled: bool | None = None) -> DecodeGraphRunner | None:
    """Decode graphs where they apply (CUDA, a graph-safe dispatcher, kernel attention), else None
    with the reason logged. `enabled=False` (kernels.cuda_graphs=false; None: EPSERVE_CUDA_GRAPHS,
    read now, "0" is off) keeps decode eager, on every EP rank alike: ranks that capture and
    ranks that do not would run different collectives."""
    if enabled is None:
        import os

        enabled = os.environ.get("EPSERVE_CUDA_GRAPHS", "1") != "0"
    if not enabled:
        log.info("decode CUDA graphs off (kernels.cuda_graphs=false)")
        return None
    if model.device.type != "cuda":
        return None
    try:
        return DecodeGraphRunner(model, kv_caches, max_batch=max_batch, max_blocks_per_seq=max_blocks_per_seq,
                                 buckets=buckets, inputs=inputs)
    except GraphsUnsupported as exc:
        log.info("decode stays eager: %s", exc)
        return None
