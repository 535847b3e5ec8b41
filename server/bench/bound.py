"""What perfect balance could buy a phase, from its measured per-rank load and MoE time.

In an EP step every MoE layer waits for its busiest rank: the layer's time follows the
largest number of (token, expert) pairs any rank computes, max_r load[l][r]. Perfectly
balanced, every rank would compute the mean, mean_r load[l][r]. From one probe pass of a
policy (eager steps, CUDA events around each MoE block on rank 0, the per-rank load of every
step, the phase's wall time) this module fits the time per pair on the busiest rank,

    us_per_pair = sum over steps and layers of MoE time / sum of max_r load,

and replaces the busiest rank's pairs by the mean:

    balanced MoE time = us_per_pair * sum of mean_r load
    speed-up bound    = phase time / (phase time - MoE time + balanced MoE time).

All of the MoE block's time (gate, policy, all-to-alls, experts) is counted as proportional
to the busiest rank's load, so the bound is an upper bound on what balance alone can give.
At ep_size 1 there is one rank, max equals mean, and the bound is 1.0: on one GPU a
policy's effect on speed is a kernel effect (expert tiles, weights read), not balance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class ProbeStep:
    """One forward step of a probe pass."""

    moe_ms: Sequence[float]  # [L] MoE block time per layer on rank 0 (waits for the busiest rank)
    rank_pairs: Sequence[Sequence[int]]  # [L][R] (token, expert) pairs each EP rank computed


def balance_bound(steps: Sequence[ProbeStep], phase_s: float) -> dict:
    """Fit and bound over a phase's forward steps, which took `phase_s` of wall time (see the
    module docstring) -> plain data."""
    if not steps:
        raise ValueError("a phase needs at least one probe step")
    moe_s = sum(sum(s.moe_ms) for s in steps) / 1e3
    busiest = sum(max(row) for s in steps for row in s.rank_pairs)
    mean = sum(sum(row) / len(row) for s in steps for row in s.rank_pairs)
    return linear_bound(phase_s, moe_s, busiest, mean)


def linear_bound(phase_s: float, moe_s: float, busiest: float, mean: float) -> dict:
    """The bound from a phase's totals: wall time, MoE time, and the busiest and mean rank's
    (token, expert) pairs summed over its steps and layers (see the module docstring)."""
    s_per_pair = moe_s / busiest if busiest else 0.0
    balanced_moe_s = s_per_pair * mean
    balanced_phase_s = phase_s - moe_s + balanced_moe_s
    return {
        "phase_s": phase_s,
        "moe_s": moe_s,
        "moe_share": moe_s / phase_s if phase_s else 0.0,
        "pairs_busiest_rank": busiest,
        "pairs_mean_rank": mean,
        "rank_max_over_mean": busiest / mean if mean else 1.0,
        "us_per_pair": s_per_pair * 1e6,
        "balanced_moe_s": balanced_moe_s,
        "speedup_bound": phase_s / balanced_phase_s if balanced_phase_s > 0 else 1.0,
    }


def uplift_over_bound(ratio: float, bound: float) -> dict:
    """A policy's measured speed ratio to natural against the bound natural's imbalance allows.

    `uplift_over_bound` = (ratio - 1) / (bound - 1): the share of the possible gain realised
    (None where the bound allows no gain, e.g. ep_size 1); `ratio_over_bound` = ratio / bound
    (1.0: all of it)."""
    gain = bound - 1.0
    return {"uplift": ratio - 1.0, "bound_uplift": gain,
            "uplift_over_bound": (ratio - 1.0) / gain if gain > 1e-9 else None,
            "ratio_over_bound": ratio / bound}
