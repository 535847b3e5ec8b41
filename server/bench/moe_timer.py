"""Time every MoE block (gate, policy, counters, dispatch, experts, combine) of eager steps.

CUDA events are recorded on the current stream before and after each MoELayer forward, so the
time is device time including any idle gap the block causes (an EP block waits for the host
to learn its all-to-all sizes). On CPU the host clock is used. Graph replays bypass module
hooks, so this measures eager steps only; the benchmark runs a few for it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ..moe.layer import MoELayer


class MoETimer:
    def __init__(self, model) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.device = model.device
        self._marks: dict[int, list] = {m.moe_index: [] for m in self.layers}  # moe_index -> [(start, end)]
        self._open: dict[int, object] = {}
        self._handles: list = []

    def _now(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    @contextmanager
    def recording(self):
        """Hooks on every MoE block while the context is open."""
        for layer in self.layers:
            idx = layer.moe_index
            self._handles.append(layer.register_forward_pre_hook(lambda m, a, idx=idx: self._open.__setitem__(idx, self._now())))
            self._handles.append(layer.register_forward_hook(
                lambda m, a, out, idx=idx: self._marks[idx].append((self._open.pop(idx), self._now()))))
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()

    def take_calls(self) -> list[list[float]]:
        """[F][L] ms of every forward whose MoE blocks have all finished since the last take
        (synchronises), in order: each forward calls every MoE layer once, so the i-th mark of
        each layer is forward i's. A forward still running (another thread) stays for later."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        order = sorted(self._marks)
        done = min(len(self._marks[idx]) for idx in order) if order else 0
        out: list[list[float]] = [[] for _ in range(done)]
        for idx in order:
            pairs = self._marks[idx]
            for call, (a, b) in enumerate(pairs[:done]):
                out[call].append(a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3)
            del pairs[:done]
        return out

    def take_ms(self) -> list[float]:
        """Mean ms per call of each MoE layer since the last take (synchronises), then clears."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        out = []
        for idx in sorted(self._marks):
            pairs = self._marks[idx]
            if self.device.type == "cuda":
                ms = [a.elapsed_time(b) for a, b in pairs]
            else:
                ms = [(b - a) * 1e3 for a, b in pairs]
            out.append(sum(ms) / len(ms) if ms else float("nan"))
            pairs.clear()
        return out
