"""An EP step's time from its parts, the way DP attention + EP runs it.

Every collective is a barrier: no rank starts a layer's dispatch before all ranks have
packed, and no rank goes on before its partial sums are back. So a step is a chain of
segments, each ending at a barrier:

  local work   first: embedding, the dense layers and the first MoE layer's local work (plus
               the final norm, head and sampler, which close the last segment); then one MoE
               layer's local work per further layer. Each segment takes its slowest rank.
  per MoE layer: all-gather (modelled) + the slowest rank's experts (measured) + all-to-all
               back (modelled).

    step = max_r(edge_r + dense_layers * D_r + M_r) + (moe_layers - 1) * max_r(M_r)
         + sum over MoE layers l of [ gather_l + max_r X_r,l + return_l ]

(edge, D, M: rank_timer.py; X: expert_timer.py; gather/return: wire.py). The engine overlaps
nothing across a barrier, so nothing else is overlapped here.

That chain is the GPUs' busy time. An eager step (prefill; decode without graphs) is also a
chain of launches on the host, and the host queues the next layer's kernels while the GPU is
still on this layer's experts: the step takes whichever chain is longer,

    step = max(device chain, max_r[edge_r + dense_layers * D_r + moe_layers * (M_r + X_host)] on the host)

with each part's host issue time measured beside its busy time (StepClock.hold_ms). Where the
host is the longer chain, the step's wait for slow ranks hides behind it. Folding the head into the first
segment takes max(a + b) for max(a) + max(b) once per step: at most one segment's spread.

Waiting for stragglers: what each segment and each layer's experts take beyond the mean rank.
The ceiling of rank balance: the same step with every layer's experts at the mean rank's time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .rank_timer import RankStepTimes


@dataclass
class StepTime:
    """One step's composition (ms); `critical` names the slowest rank of each MoE layer.
    host_ms: an eager step's host chain (0 for graph replays); the step takes the larger chain."""

    local_ms: float
    expert_ms: float
    expert_mean_ms: float
    wire_ms: float
    local_wait_ms: float  # local segments beyond the mean rank
    critical: list[int] = field(default_factory=list)  # [MoE layer] rank whose experts finish last
    host_ms: float = 0.0  # the slowest rank's host issue time for the whole step
    host_local_ms: float = 0.0  # the same without the experts' calls (what a no-experts run shows)

    @property
    def device_ms(self) -> float:
        return self.local_ms + self.expert_ms + self.wire_ms

    @property
    def total_ms(self) -> float:
        return max(self.device_ms, self.host_ms)

    @property
    def host_excess_ms(self) -> float:
        """What the host adds beyond the device chain (launch-bound eager steps)."""
        return self.total_ms - self.device_ms

    @property
    def local_alone_ms(self) -> float:
        """The step's local work without experts or wire, host-bound or not."""
        return max(self.local_ms, self.host_local_ms)

    @property
    def ceiling_ms(self) -> float:
        """The step with every layer's experts at the mean rank's time."""
        return max(self.device_ms - (self.expert_ms - self.expert_mean_ms), self.host_ms)

    @property
    def straggler_ms(self) -> float:
        local_wait = self.local_wait_ms if self.device_ms >= self.host_ms else 0.0  # host-bound: hidden
        return self.total_ms - self.ceiling_ms + local_wait


def compose_step(local: Sequence[RankStepTimes], experts: np.ndarray, wire_per_layer_ms: float, *,
                 dense_layers: int, expert_host_ms: float = 0.0) -> StepTime:
    """local [ep] per-rank local work, experts [moe layers, ep] ms, the two collectives of one
    layer (ms); expert_host_ms: host ms to issue one layer's expert call (eager steps on CUDA)."""
    edge = np.array([t.edge_ms for t in local])
    dense = np.array([t.dense_layer_ms for t in local])
    layer = np.array([t.moe_layer_ms for t in local])
    moe_layers = experts.shape[0]
    first = edge + dense_layers * dense + layer  # [ep]
    local_ms = float(first.max() + (moe_layers - 1) * layer.max())
    local_mean = float(first.mean() + (moe_layers - 1) * layer.mean())
    host_local = np.array([t.host_edge_ms + dense_layers * t.host_dense_layer_ms + moe_layers * t.host_moe_layer_ms
                           for t in local])  # [ep]
    host_local_ms = float(host_local.max()) if host_local.any() else 0.0
    host_ms = float((host_local + moe_layers * expert_host_ms).max()) if host_local_ms else 0.0
    return StepTime(local_ms=local_ms, expert_ms=float(experts.max(1).sum()), expert_mean_ms=float(experts.mean(1).sum()),
                    wire_ms=moe_layers * wire_per_layer_ms, local_wait_ms=local_ms - local_mean,
                    critical=experts.argmax(1).tolist(), host_ms=host_ms, host_local_ms=host_local_ms)


@dataclass
class PhaseTime:
    """Steps of one phase, each weighted by how many steps of the run it stands for."""

    steps: list[tuple[StepTime, float]] = field(default_factory=list)

    def add(self, step: StepTime, weight: float = 1.0) -> None:
        self.steps.append((step, weight))

    def total(self, attr: str) -> float:
        return sum(getattr(s, attr) * w for s, w in self.steps)

    def summary(self, tokens: int) -> dict:
        total = self.total("total_ms")
        ceiling = self.total("ceiling_ms")
        return {
            "tokens": tokens, "step_ms": total / max(sum(w for _, w in self.steps), 1e-9), "time_ms": total,
            "tok_s": tokens / (total / 1e3) if total else 0.0,
            "breakdown_ms": {"local": self.total("local_ms"), "experts": self.total("expert_ms"),
                             "wire": self.total("wire_ms"), "host_excess": self.total("host_excess_ms"),
                             "local_alone": self.total("local_alone_ms")},
            "straggler_ms": self.total("straggler_ms"), "straggler_share": self.total("straggler_ms") / total if total else 0.0,
            "ceiling_speedup": total / ceiling if ceiling else 1.0,
        }
