"""Repeated measurements -> median, 95% bootstrap confidence interval and spread.

Throughput drifts between runs on a shared machine as much as a routing policy changes it,
so the experiment measures every policy in every repetition (A B C A B C ...) and compares
policies *within* a repetition: the ratio policy / natural of repetition i pairs two
measurements taken seconds apart. The CI of that ratio comes from resampling repetitions
(percentile bootstrap of the median, seeded so a report is reproducible from its numbers).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def bootstrap_median_ci(values: Sequence[float], *, level: float = LEVEL, resamples: int = RESAMPLES,
                        seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the median of `values` (n >= 1; n == 1 gives a zero-width CI)."""
    xs = np.asarray(values, dtype=np.float64)  # [n]
    if xs.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, xs.size, size=(resamples, xs.size))  # [R, n] indices, with replacement
    medians = np.median(xs[picks], axis=1)  # [R]
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(medians, [tail, 100 - tail])
    return float(lo), float(hi)


def describe(values: Sequence[float], *, seed: int = 0) -> dict:
    """{"median", "ci95": [lo, hi], "ci_half_width_rel", "min", "max", "spread_rel", "n", "values"}.

    `ci_half_width_rel` is half the CI's width over the median (the ±% a reader quotes);
    `spread_rel` is (max - min) / median over the repetitions."""
    xs = [float(v) for v in values]
    if not xs or not all(math.isfinite(v) for v in xs):
        raise ValueError(f"need finite measurements, got {xs}")
    med = float(np.median(xs))
    lo, hi = bootstrap_median_ci(xs, seed=seed)
    scale = abs(med) if med else 1.0
    return {"median": med, "ci95": [lo, hi], "ci_half_width_rel": (hi - lo) / 2 / scale,
            "min": min(xs), "max": max(xs), "spread_rel": (max(xs) - min(xs)) / scale, "n": len(xs), "values": xs}


def paired_ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """values[i] / baseline[i]: repetition i of a policy against repetition i of the baseline."""
    if len(values) != len(baseline):
        raise ValueError(f"paired ratios need as many repetitions on both sides ({len(values)} vs {len(baseline)})")
    return [v / b for v, b in zip(values, baseline)]


def ratio_of_medians_ci(values: Sequence[float], baseline: Sequence[float], *, level: float = LEVEL,
                        resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Unpaired: median(values) / median(baseline), with each side resampled on its own (for
    figures not measured in the same repetitions, e.g. served vs in-process)."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ra = np.median(a[rng.integers(0, a.size, size=(resamples, a.size))], axis=1)  # [R]
    rb = np.median(b[rng.integers(0, b.size, size=(resamples, b.size))], axis=1)  # [R]
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(ra / rb, [tail, 100 - tail])
    ratio = float(np.median(a) / np.median(b))
    return {"ratio": ratio, "ci95": [float(lo), float(hi)], "ci_half_width_rel": float(hi - lo) / 2 / ratio}
