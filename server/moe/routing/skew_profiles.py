"""Expert-popularity profiles for `skewed`, and the one-parameter solve that hits a target metric.

A profile maps a shape parameter s >= 0 to per-expert weights (s = 0 is uniform; larger s is
more skewed). `inclusion_probabilities` turns weights into inclusion probabilities that sum to
k with none above 1 (a token cannot pick an expert twice). `solve_profile` bisects on s until
the expected loads give the asked-for figure of the chosen metric:

  expert_max_over_mean  max/mean of the per-expert load (>= 1)
  max_vio               MaxVio, (max - mean)/mean of the per-expert load (>= 0); the figure the
                        auxiliary-loss-free balancing work (Wang et al., 2024) reports
  rank_balancedness     mean/max of the per-EP-rank load (in (0, 1]; 1 is perfect balance)

Profiles: `zipf` (weight (rank + 1) ** -s, ranks a seeded shuffle of the experts),
`lognormal` (weight exp(s * z_e) with z_e standard normal draws, seeded): DeepEP's measurements
of real routing found log-normal expert popularity the best fit, and `power_law` (each
expert's weight a draw from p(x) ~ x ** -s on [1, 3276.8]: AIConfigurator's expert-load model,
s its alpha; s = 0 is uniform draws, not uniform weights). Both draw from a generator
seeded by (policy seed, context seed, layer): deterministic per layer, different across layers.
"""
from __future__ import annotations

import math
import random
from typing import Callable

from .base import PolicyConfigError

METRICS = ("expert_max_over_mean", "max_vio", "rank_balancedness")
S_MAX = 64.0


def inclusion_probabilities(weights: list[float], top_k: int) -> list[float]:
    """Weights -> probabilities summing to top_k, each <= 1 (water-filling: cap, give the rest out)."""
    n = len(weights)
    p = [0.0] * n
    free = set(range(n))
    left = float(top_k)
    while free:
        total = sum(weights[e] for e in free)
        if total <= 0:
            for e in free:
                p[e] = left / len(free)
            break
        capped = [e for e in free if weights[e] * left / total >= 1.0]
        if not capped:
            for e in free:
                p[e] = weights[e] * left / total
            break
        for e in capped:
            p[e] = 1.0
            free.discard(e)
        left = top_k - (n - len(free))
    return p


def imbalance(p: list[float], metric: str, ep_size: int) -> float:
    """max/mean of the loads the metric looks at (experts or ranks): larger is more skewed."""
    if metric == "rank_balancedness":
        per = len(p) // ep_size
        loads = [sum(p[r * per:(r + 1) * per]) for r in range(ep_size)]
    else:
        loads = p
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def target_imbalance(metric: str, target: float) -> float:
    """The metric's target as the max/mean that `imbalance` measures; PolicyConfigError if out of range."""
    if metric not in METRICS:
        raise PolicyConfigError(f"routing.metric must be one of {METRICS}, got {metric!r}")
    if metric == "expert_max_over_mean":
        if target < 1.0:
            raise PolicyConfigError(f"routing.target (per-expert max/mean) must be >= 1.0, got {target!r}")
        return target
    if metric == "max_vio":
        if target < 0.0:
            raise PolicyConfigError(f"routing.target (MaxVio, (max - mean)/mean) must be >= 0, got {target!r}")
        return 1.0 + target
    if not 0.0 < target <= 1.0:
        raise PolicyConfigError(f"routing.target (rank balancedness, mean/max) must be in (0, 1], got {target!r}")
    return 1.0 / target


def zipf_weights(rng: random.Random, num_experts: int) -> Callable[[float], list[float]]:
    experts = list(range(num_experts))
    rng.shuffle(experts)  # experts[r] holds popularity rank r
    rank_of = [0] * num_experts
    for r, e in enumerate(experts):
        rank_of[e] = r
    return lambda s: [(rank_of[e] + 1) ** -s for e in range(num_experts)]


def lognormal_weights(rng: random.Random, num_experts: int) -> Callable[[float], list[float]]:
    z = [rng.gauss(0.0, 1.0) for _ in range(num_experts)]
    return lambda s: [math.exp(s * x) for x in z]


#: largest value of a power_law draw (smallest: 1): AIConfigurator's choice for a 4096-token
#: step, 0.8 x num_tokens (its collect_moe.py power_law_logits)
POWER_LAW_XMAX = 0.8 * 4096


def power_law_weights(rng: random.Random, num_experts: int) -> Callable[[float], list[float]]:
    """Weight of each expert drawn from a power law p(x) ~ x ** -s on [1, POWER_LAW_XMAX], by the
    inverse CDF of seeded uniforms (AIConfigurator's expert-load model; s is its alpha). s = 1 is
    the log-uniform limit."""
    u = [rng.random() for _ in range(num_experts)]
    hi = POWER_LAW_XMAX

    def at(s: float) -> list[float]:
        if abs(s - 1.0) < 1e-9:
            return [hi ** x for x in u]
        a = 1.0 - s
        return [((hi ** a - 1.0) * x + 1.0) ** (1.0 / a) for x in u]
    return at


PROFILES = {"zipf": zipf_weights, "lognormal": lognormal_weights, "power_law": power_law_weights}


def solve_profile(weights_at: Callable[[float], list[float]], top_k: int, ep_size: int, metric: str,
                  goal: float, where: str) -> list[float]:
    """Inclusion probabilities of the profile whose expected loads read `goal` (as `imbalance`)."""
    def value(s: float) -> float:
        return imbalance(inclusion_probabilities(weights_at(s), top_k), metric, ep_size)

    # A coarse scan first: over ranks the figure need not grow monotonically with s, so bisect
    # only within the first step of the scan that crosses the goal.
    grid = [S_MAX * (i / 48) ** 2 for i in range(49)]
    values = [value(s) for s in grid]
    crossing = next((i for i, v in enumerate(values) if v >= goal * (1 - 1e-9)), None)
    if crossing is None:
        raise PolicyConfigError(f"routing.target is unreachable for {where}: this profile reaches at most "
                                f"{_shown(metric, max(values))} ({metric})")
    if crossing == 0:
        return inclusion_probabilities(weights_at(0.0), top_k)
    lo, hi = grid[crossing - 1], grid[crossing]
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if value(mid) < goal else (lo, mid)
    return inclusion_probabilities(weights_at(hi), top_k)


def _shown(metric: str, max_over_mean: float) -> str:
    if metric == "rank_balancedness":
        return f"{1 / max_over_mean:.4g}"
    if metric == "max_vio":
        return f"{max_over_mean - 1:.4g}"
    return f"{max_over_mean:.4g}"
