"""`record`: natural routing, and every call's top-k ids written to a trace file.

    python -m server routing=record routing.path=/tmp/tiny.eptrace
    python -m server routing=record 'routing.path="/tmp/tiny.rank{rank}.eptrace"' parallel=ep2
    (Hydra's override grammar needs the inner quotes around a value with braces)

What it costs (why it is cheap enough to leave on while measuring a real workload):
  * per call, one device-to-device copy of the [N, k] ids into a preallocated buffer of
    `flush_tokens` rows; the position is a host integer (N is a shape, known without a sync);
  * per `flush_tokens` recorded rows, one device-to-host copy of the buffer (the only host
    synchronisation) and one file write. With the default 65536 rows that is one sync per
    65536 / (layers x tokens per step) steps: a 48-layer model at 512 tokens per step syncs
    every ~3 steps; at 8 tokens per step (decode, batch 8) every ~170 steps;
  * memory: flush_tokens x k ids on the device (uint8 when E <= 256).
A call with more than `flush_tokens` rows is written straight away (one sync for that call).

Not CUDA-graph capturable: the bookkeeping is host code that a graph replay would skip, so a
call under capture raises instead of recording nothing. Record with graphs off.

The trace is completed (last block flushed, file closed) by `close()`, at interpreter exit,
or at the exit of a spawned EP worker (multiprocessing finalizer). A process killed with
SIGKILL loses at most the last unflushed `flush_tokens` rows; the reader reports a
truncated block instead of returning partial data.
"""
from __future__ import annotations

from multiprocessing.util import Finalize
from pathlib import Path
from typing import ClassVar

import torch

from .base import PolicyConfigError, RoutingPolicy
from .context import RoutingContext
from .registry import register_policy
from .trace_file import TraceHeader, TraceWriter, id_dtype_name, torch_id_dtype

RANK_FIELD = "{rank}"
MAX_FLUSH_TOKENS = 1 << 22  # rows kept on the device between writes (4M x k ids: tens of MB at most)


def rank_path(path: str, rank: int) -> Path:
    """The file one EP rank reads or writes: `{rank}` in `path` becomes the rank number."""
    return Path(path.replace(RANK_FIELD, str(rank))).expanduser()


class _Recorder:
    """One process's open trace: device buffer, pending call records, step counter."""

    def __init__(self, path: Path, ctx: RoutingContext, device: torch.device, capacity: int, extra: dict) -> None:
        header = TraceHeader(num_experts=ctx.num_experts, top_k=ctx.top_k, id_dtype=id_dtype_name(ctx.num_experts),
                             ep_rank=ctx.ep_rank, ep_size=ctx.ep_size, extra=extra)
        self.writer = TraceWriter(path, header)
        self.top_k = ctx.top_k
        self.buffer = torch.empty(capacity, ctx.top_k, dtype=torch_id_dtype(header.id_dtype), device=device)  # [C, k]
        self.fill = 0
        self.pending: list[tuple[int, int, int]] = []  # (step, layer, tokens) of rows in the buffer
        self.step, self.last_layer = -1, None

    def append(self, layer: int, ids: torch.Tensor) -> None:
        """ids [N, k] int32 on the buffer's device."""
        n = ids.shape[0]
        if self.last_layer is None or layer <= self.last_layer:
            self.step += 1
        self.last_layer = layer
        if self.fill + n > self.buffer.shape[0]:
            self.flush()
        if n > self.buffer.shape[0]:
            self.writer.write_block([(self.step, layer, n)], ids.cpu())
            return
        self.buffer[self.fill:self.fill + n].copy_(ids, non_blocking=True)
        self.pending.append((self.step, layer, n))
        self.fill += n

    def flush(self) -> None:
        if self.pending:
            self.writer.write_block(self.pending, self.buffer[:self.fill].to(torch.int32).cpu())
        self.pending, self.fill = [], 0

    def close(self) -> None:
        if self.writer._file is not None:
            self.flush()
            self.writer.close()


@register_policy("record")
class RecordPolicy(RoutingPolicy):
    guarantee = "none: the router's own choice (natural), written to a trace file"
    #: host bookkeeping per call: an engine must not capture this policy in a CUDA graph
    graph_safe: ClassVar[bool] = False
    uses_files: ClassVar[bool] = True

    def __init__(self, path: str | None = None, weights: str = "keep", seed: int = 0, flush_tokens: int = 65536) -> None:
        super().__init__(weights=weights, seed=seed)
        if not isinstance(path, str) or not path:
            raise PolicyConfigError("routing.path must name the trace file to write, e.g. routing.path=/tmp/run.eptrace")
        if (not isinstance(flush_tokens, int) or isinstance(flush_tokens, bool)
                or not 1 <= flush_tokens <= MAX_FLUSH_TOKENS):
            raise PolicyConfigError(f"routing.flush_tokens must be an integer in [1, {MAX_FLUSH_TOKENS}] (rows kept "
                                    f"on the device between writes), got {flush_tokens!r}")
        self.path = path
        self.flush_tokens = flush_tokens
        self._recorder: _Recorder | None = None
        self._finalizer: Finalize | None = None
        self._trace_file: Path | None = None
        self._closed = False

    def params(self) -> dict:
        return {**super().params(), "path": self.path, "flush_tokens": self.flush_tokens}

    def validate(self, num_experts: int, top_k: int, ep_size: int, num_layers: int | None = None) -> None:
        if ep_size > 1 and RANK_FIELD not in self.path:
            raise PolicyConfigError(
                f"routing.path={self.path!r} must contain {RANK_FIELD} when parallel.ep_size={ep_size} > 1: "
                "each EP rank writes its own trace")
        for rank in range(ep_size):
            parent = rank_path(self.path, rank).parent
            if not parent.is_dir():
                raise PolicyConfigError(f"routing.path={self.path!r}: folder {parent} does not exist")

    def route(self, topk_ids, topk_weights, router_logits, ctx: RoutingContext) -> torch.Tensor:
        ids = topk_ids.to(torch.int32)  # [N, k]
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("routing=record cannot run inside CUDA-graph capture (its bookkeeping is host code); "
                               "record with CUDA graphs disabled")
        self._open(ctx, ids.device).append(ctx.layer, ids)
        return ids

    def _open(self, ctx: RoutingContext, device: torch.device) -> _Recorder:
        if self._closed:
            raise RuntimeError(f"routing=record: the trace {self.path!r} was closed; build a new policy to record again")
        if self._recorder is None:
            extra = {"policy": "record", "seed": self.seed, "weights": self.weights}
            self._trace_file = rank_path(self.path, ctx.ep_rank)
            self._recorder = _Recorder(self._trace_file, ctx, device, self.flush_tokens, extra)
            # also runs at a spawned worker's exit; close() runs it sooner, once
            self._finalizer = Finalize(self, self._recorder.close, exitpriority=10)
        return self._recorder

    def flush(self) -> None:
        """Write buffered calls to the file now (one host sync)."""
        if self._recorder is not None:
            self._recorder.flush()

    def close(self) -> None:
        """Flush and close the trace. Later calls raise (they would overwrite a finished file)."""
        if self._finalizer is not None:
            self._finalizer()  # the recorder's close, once; the exit hook no longer holds it
        elif self._recorder is not None:
            self._recorder.close()
        self._recorder, self._finalizer = None, None  # the device buffer goes with it
        self._closed = True

    def release(self) -> None:
        """Switched away from: the trace is complete and its descriptor closed now, not at exit."""
        self.close()

    @property
    def trace_path(self) -> Path | None:
        """The file this process writes (known after the first call)."""
        return self._trace_file

    def __getstate__(self) -> dict:
        # Shipped to spawned EP workers before any call: each process opens its own file.
        state = self.__dict__.copy()
        if state["_recorder"] is not None:
            raise RuntimeError("routing=record: a policy that already opened its trace cannot be copied to another process")
        return state
