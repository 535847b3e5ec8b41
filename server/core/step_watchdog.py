"""The step watchdog: a step that runs far longer than steps do means a hung EP rank.

A rank that is stopped (SIGSTOP, a debugger, a wedged driver) or stuck in a kernel never
exits, so nothing sees it die: rank 0 waits in a collective for it (the collective timeout is
30 minutes) and every stream hangs with health still SERVING. The watchdog times each engine
step; the thread that watches for dead ranks asks it, a few times a second, whether the step
in flight is overdue, and the engine then fails as it does when a rank dies.

How long a step may take: max(engine.step_timeout_s, P99_FACTOR x the p99 of the last
WINDOW steps), so a model whose steps are slow on this machine (a big prefill on CPU) raises
its own limit. The first FIRST_STEPS steps of the engine, and the steps that switch the
routing policy (CUDA graphs are captured again) or move experts (EPLB), may take
engine.first_step_timeout_s instead: compiles, graph captures and first-touch allocation
happen there, and their times stay out of the p99. engine.step_timeout_s = 0 turns the watchdog off.

Thread-safety: `begin`/`end`/`expect_long` are called by the stepping thread, `overdue` by
the watching thread; each reads or writes a few attributes, under a lock.
"""
from __future__ import annotations

import threading
import time
from collections import deque

P99_FACTOR = 10.0  # a step may take this many times the recent p99 (when that exceeds the floor)
WINDOW = 256  # recent step durations the p99 is taken over
FIRST_STEPS = 8  # steps of a fresh engine that get the start-up allowance


class StepWatchdog:
    def __init__(self, timeout_s: float, first_timeout_s: float) -> None:
        self.timeout_s = float(timeout_s)
        self.first_timeout_s = max(float(first_timeout_s), self.timeout_s)
        self._lock = threading.Lock()
        self._durations: deque[float] = deque(maxlen=WINDOW)
        self._steps = 0  # steps ended
        self._started: float | None = None  # monotonic start of the step in flight
        self._long_left = 0  # steps (this one included) that get the start-up allowance

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def begin(self) -> None:
        with self._lock:
            self._started = time.monotonic()

    def end(self) -> None:
        with self._lock:
            if self._started is None:
                return
            if not (self._steps < FIRST_STEPS or self._long_left > 0):  # compiles and captures are not the norm
                self._durations.append(time.monotonic() - self._started)
            self._started = None
            self._steps += 1
            self._long_left = max(0, self._long_left - 1)

    def expect_long(self, steps: int = 2) -> None:
        """The step in flight and the next `steps - 1` may take the start-up allowance (with
        overlapped steps, the work a plan carries is waited for by the next step)."""
        with self._lock:
            self._long_left = max(self._long_left, steps)

    def limit_s(self) -> float:
        """How long the step in flight may run."""
        with self._lock:
            return self._limit_locked()

    def _limit_locked(self) -> float:
        if self._steps < FIRST_STEPS or self._long_left > 0:
            return self.first_timeout_s
        ordered = sorted(self._durations)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0
        return max(self.timeout_s, P99_FACTOR * p99)

    def overdue(self) -> str | None:
        """Why the step in flight counts as hung, or None (also when the watchdog is off)."""
        if not self.enabled:
            return None
        with self._lock:
            if self._started is None:
                return None
            ran, limit = time.monotonic() - self._started, self._limit_locked()
            step = self._steps + 1
        if ran <= limit:
            return None
        return (f"engine step {step} has run {ran:.1f}s, over its {limit:.1f}s limit (engine.step_timeout_s, or "
                f"{P99_FACTOR:g}x the recent p99 step time): an EP rank is hung")
