"""One EP rank's expert kernel, timed on the rows its layout gives it: the production path.

The kernel is the one the rank's dispatcher calls (experts.path, chosen by the model's
kernel backend): `partial_topk` on the gathered rows for the all-gather dispatch (slots of
-1 skipped), `local_topk` at ep_size 1. Its experts are one LocalExperts of the rank's slot
count with random weights (one layer's weights serve every layer and every rank: a kernel's
time does not depend on the values), its hidden rows random, laid out as the dispatcher lays
them out on parallel.dispatch_wire (a strided view of the packed buffer; on the fp8 wire, FP8
experts read its codes and scales as they are, dispatch/all_gather.experts_on_rows).

On CUDA each row count gets one captured graph over static buffers; a layout's ids are
copied in and the graph replayed `reps` times, each replay after the L2 cache is flushed
(writing twice its size), timed with events; the median, less the replay floor of an empty
graph measured the same way, is the kernel's time. On CPU the torch path runs under the
host clock. A key (rows and each expert's row tiles, see `time`) is timed once.
Under bench.expert_precision=fp8 the experts hold e4m3 codes and 128x128 block scales
(expert_precision.py) and `experts.path` is the engine's Fp8ExpertPath, so the same calls time
the FP8 kernels. `standalone_ms` times the bare fused-MoE op (the FP8 one for FP8 experts)
on the same rows in a graph of its own (and eagerly, to show what launches add) for the
run's self-check.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from ...kernels.backend import KernelBackend
from ...moe.dispatch.all_gather import expert_rows, experts_on_rows
from ...moe.dispatch.wire import row_layout
from ...moe.experts import LocalExperts
from .expert_precision import fill_random_fp8
from .layout import LayerLayout


class ExpertKernelTimer:
    def __init__(self, spec, slots_per_rank: int, device: torch.device, dtype: torch.dtype, reps: int = 10,
                 seed: int = 0, kernels: KernelBackend | None = None, wire: str = "bf16") -> None:
        """`wire`: parallel.dispatch_wire; the gathered rows are laid out as it sends them, and
        FP8 experts on the fp8 wire read its codes and scales as they are, as the engine's do."""
        self.device, self.dtype, self.reps, self.top_k = device, dtype, reps, spec.top_k
        self.wire = wire
        self.hidden = spec.hidden_size
        self.experts = LocalExperts(slots_per_rank, spec.hidden_size, spec.moe_intermediate_size, spec.hidden_act,
                                    dtype=dtype, device=device, kernels=kernels or KernelBackend.for_device(device))
        gen = torch.Generator(device=device).manual_seed(seed)
        if self.experts.weight_format == "fp8":  # kernels.expert_weights from bench.expert_precision
            fill_random_fp8(self.experts, spec.initializer_range, gen)
        else:
            with torch.no_grad():
                for p in (self.experts.gate_up_proj, self.experts.down_proj):
                    p.normal_(0.0, spec.initializer_range, generator=gen)
        self.cuda = device.type == "cuda"
        self.cache: dict[tuple, float] = {}
        self._tiles: dict[int, int] = {}  # rows -> BLOCK_M of the kernel at that row count
        self._inputs: dict[tuple, tuple] = {}  # (kind, rows) -> (ids buffer, call, graph or None)
        self._host: dict[tuple, float] = {}  # (kind, rows) -> host ms to issue one eager call
        self.floor_ms = 0.0
        if self.cuda:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            self._flush = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device=device)
            self.floor_ms = self._floor()

    # ---- inputs ----
    def _call(self, kind: str, rows: int) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        gen = torch.Generator(device=self.device).manual_seed(rows)
        ids = torch.zeros(rows, self.top_k, dtype=torch.int32, device=self.device)  # [T, k], refilled per key
        path, experts = self.experts.path, self.experts
        if kind == "local":
            x = torch.randn(rows, self.hidden, generator=gen, device=self.device).to(self.dtype)  # [T, H]
            w = torch.full((rows, self.top_k), 1.0 / self.top_k, device=self.device)
            return ids, lambda: path.local_topk(experts, x, ids, w)
        layout = row_layout(self.wire, self.hidden, self.dtype, self.top_k)
        x = torch.randn(rows, self.hidden, generator=gen, device=self.device).to(self.dtype)  # [T, H]
        w = torch.full((rows, self.top_k), 1.0 / self.top_k, device=self.device)
        packed = layout.pack(x, ids, w, rows)  # [T, B] as the all-gather leaves it
        hidden, _, weights = expert_rows(layout, packed, experts)
        return ids, lambda: experts_on_rows(experts, hidden, ids, weights)

    def _prepared(self, kind: str, rows: int) -> tuple:
        key = (kind, rows)
        if key not in self._inputs:
            ids, call = self._call(kind, rows)
            graph = None
            if self.cuda:
                ids.copy_((torch.arange(rows * self.top_k, device=self.device) % self.experts.num_local)
                          .view(rows, self.top_k).to(torch.int32))
                graph = self._captured(call)
            self._inputs[key] = (ids, call, graph)
        return self._inputs[key]

    def _captured(self, call: Callable[[], torch.Tensor]) -> torch.cuda.CUDAGraph:
        """`call` warmed on a side stream (compiles, allocates), then captured in a graph."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            call()
            call()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        return graph

    # ---- timing ----
    def _replay_ms(self, replay: Callable[[], None]) -> float:
        times = []
        for _ in range(self.reps):
            self._flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            replay()
            b.record()
            times.append((a, b))
        torch.cuda.synchronize(self.device)
        return statistics.median(a.elapsed_time(b) for a, b in times)

    def _floor(self) -> float:
        """An (almost) empty graph's replay, timed like a kernel's: what every replay adds."""
        x = torch.zeros(1, device=self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x.add_(1)
        return self._replay_ms(graph.replay)

    def tile_rows(self, rows: int) -> int:
        """Rows per expert tile of the fused kernel at this row count (its BLOCK_M); 1 off CUDA."""
        if not self.cuda or self.experts.path.name == "torch":
            return 1
        from ...moe.kernels.moe_config import get_moe_config

        e = self.experts
        if e.weight_format == "fp8":
            from ...moe.kernels.fp8_config import get_fp8_moe_config

            return get_fp8_moe_config(e.num_local, e.hidden, e.intermediate, rows * self.top_k, self.device).BLOCK_M
        return get_moe_config(e.num_local, e.hidden, e.intermediate, rows * self.top_k, self.dtype, self.device).BLOCK_M

    def time(self, layout: LayerLayout, rank: int) -> float:
        """ms of rank `rank`'s expert kernel on its rows of `layout`. Cached by what the kernel
        does: the row count and each local expert's number of BLOCK_M row tiles (loads that
        fill the same tiles run the same tiles; the rest, gathering the rows and summing the
        slots, follows the row count)."""
        rows = layout.kernel_rows()
        if rows not in self._tiles:
            self._tiles[rows] = self.tile_rows(rows)
        key = layout.tile_key(rank, self._tiles[rows])
        if key in self.cache:
            return self.cache[key]
        ids, call, graph = self._prepared(layout.kind, layout.kernel_rows())
        ids.copy_(layout.local_ids(rank))
        if graph is not None:
            ms = max(self._replay_ms(graph.replay) - self.floor_ms, 0.0)
        else:
            call()  # first-call work (allocations, thread pools) stays out
            samples = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                call()
                samples.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(samples)
        self.cache[key] = ms
        return ms

    def host_ms(self, kind: str, rows: int) -> float:
        """Host ms to issue one eager call of the kernel path at this row count (CUDA; 0 on
        CPU, where `time` is all host). An eager step pays it per MoE layer beside the GPU's
        time (compose.py takes the larger chain)."""
        if not self.cuda:
            return 0.0
        key = (kind, rows)
        if key not in self._host:
            _, call, _ = self._prepared(kind, rows)
            torch.cuda.synchronize(self.device)
            samples = []
            for _ in range(max(self.reps, 5)):
                t0 = time.perf_counter()
                call()  # queued behind the previous ones: the host never waits for the GPU here
                samples.append((time.perf_counter() - t0) * 1e3)
            torch.cuda.synchronize(self.device)
            self._host[key] = statistics.median(samples)
        return self._host[key]

    def standalone_ms(self, layout: LayerLayout, rank: int) -> tuple[float, float]:
        """The bare fused-MoE op on contiguous copies of the same rows (CUDA) -> (ms in its own
        CUDA graph, timed as `time` times: the figure to compare; ms eagerly: launches included).
        No cache, no TokenRows view, no shared buffers with the timed path."""
        if not self.cuda:
            return float("nan"), float("nan")
        ids = layout.local_ids(rank).contiguous()  # [T, k]
        gen = torch.Generator(device=self.device).manual_seed(1)
        x = torch.randn(ids.shape[0], self.hidden, generator=gen, device=self.device).to(self.dtype)  # [T, H]
        w = torch.full(ids.shape, 1.0 / self.top_k, device=self.device)  # [T, k]
        e = self.experts
        if e.weight_format == "fp8":  # the op Fp8ExpertPath calls, on the e4m3 codes and block scales
            from ...moe.kernels.fused_moe_fp8 import fused_moe_fp8_triton

            weights = (e.gate_up_proj, e.gate_up_proj_scale_inv, e.down_proj, e.down_proj_scale_inv)
            run = lambda: fused_moe_fp8_triton(x, *weights, ids, w)  # noqa: E731
        else:
            run = lambda: e.path.fused_moe(x, e.gate_up_proj, e.down_proj, ids, w)  # noqa: E731
        graphed = max(self._replay_ms(self._captured(run).replay) - self.floor_ms, 0.0)
        return graphed, self._replay_ms(run)
