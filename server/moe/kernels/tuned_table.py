"""What a fused-MoE tuning run (scripts/tune_moe.py) stores per token bucket: the tuned config
only where the whole pipeline measured faster with it than with default_config.

The search times the GEMMs one by one and picks the best parts; the pipeline as a whole can
still come out slower than the heuristic (noise, launch overheads at a few tokens), and a
stored config always wins over the default at run time. A bucket cannot simply be left out
either: calls take the nearest bucket in log2 of their rows, so a missing bucket would hand its
tokens to a neighbour's config. Such a bucket stores the default config itself, and
meta.timings_us says for every bucket which one was kept beside both times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from .moe_config import MoEConfig


@dataclass(frozen=True)
class BucketResult:
    """One token bucket's measurement: the search's best config and the default it must beat."""

    tuned: MoEConfig
    default: MoEConfig
    tuned_us: float  # whole pipeline (align + gate_up + down) with `tuned`
    default_us: float  # the same with `default`, measured in the same run
    parts: Mapping[str, float | int] = field(default_factory=dict)  # per-stage times of the search, candidates tried


def kept_config(result: BucketResult) -> tuple[MoEConfig, str]:
    """(config to store, "tuned" | "default"): the tuned one only if strictly faster; a tie, a
    failed (non-finite) timing or a search that ended on the default itself keeps the default."""
    faster = math.isfinite(result.tuned_us) and math.isfinite(result.default_us) and result.tuned_us < result.default_us
    if faster and result.tuned != result.default:
        return result.tuned, "tuned"
    return result.default, "default"


def tuned_table(results: Mapping[int, BucketResult]) -> tuple[dict[str, dict], dict[str, dict]]:
    """token bucket -> result => ({"T": config JSON} for the file, {"T": timings} for meta.timings_us)."""
    table, timings = {}, {}
    for tokens, result in results.items():
        config, kept = kept_config(result)
        table[str(tokens)] = config.to_json()
        timings[str(tokens)] = {"tuned": result.tuned_us, "default": result.default_us, **result.parts, "kept": kept}
    return table, timings
