"""A WARNING for an engine step far slower than the recent ones, with what the step held.

A first-use kernel compile, an allocator stall or a slow collective shows up as one step
taking ~10-1000x its neighbours; without a trace nobody sees it, only a TTFT that is off. The
check costs a subtraction and a comparison per step: the median of the last WINDOW forward
steps is recomputed every REFRESH steps, and the step's composition is described only when it
is logged. At most one warning per second (the count of the others is in the next one).
"""
from __future__ import annotations

import logging
import statistics
import time
from collections import deque

import numpy as np

log = logging.getLogger(__name__)
WINDOW = 64  # forward steps the median is taken over
REFRESH = 16  # steps between median updates
MIN_SLOW_S = 0.02  # never warn below this (a 10x of a 0.1 ms CPU step is noise)


def composition(plan) -> str:
    """'P prefill tokens + D decode rows over S sequences' of a StepPlan (all ranks)."""
    if plan is None:
        return "nothing"
    prefill = decode = seqs = 0
    for p in plan.ranks:
        q = p.batch.query_lens
        ones = int(np.count_nonzero(q == 1))
        decode += ones
        prefill += int(q.sum()) - ones
        seqs += len(q)
    return f"{prefill} prefill tokens + {decode} decode rows ({seqs} sequences)"


class SlowStepLog:
    def __init__(self, factor: float) -> None:
        self.factor = factor
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._median: float | None = None
        self._steps = 0
        self._last_warning = 0.0
        self._suppressed = 0

    def observe(self, seconds: float, launched, finished) -> None:
        """One step() call took `seconds`; it launched plan `launched` and applied `finished`."""
        median = self._median
        if median is not None and seconds > MIN_SLOW_S and seconds > self.factor * median:
            now = time.monotonic()
            if now - self._last_warning >= 1.0:
                more = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
                log.warning("slow engine step: %.1f ms, %.0fx the median %.2f ms of the last %d; launched %s; "
                            "finished %s%s", seconds * 1e3, seconds / median, median * 1e3, len(self._recent),
                            composition(launched), composition(finished), more)
                self._last_warning, self._suppressed = now, 0
            else:
                self._suppressed += 1
        self._recent.append(seconds)
        self._steps += 1
        if self._steps % REFRESH == 0:
            self._median = statistics.median(self._recent)
