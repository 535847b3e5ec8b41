"""What EP users read about a phase's loads, gathered from the what-if's layouts.

Per MoE layer of each timed step (weighted by the steps it stands for):
  rank pairs         (token, slot) pairs each rank's kernel computes
  active experts     slots with at least one pair, per rank (decode: what the weights read follows)
  balancedness       mean/max over ranks, and over logical experts, per layer, aggregated over
                     layers (load_stats.aggregate_layers: min / p50 / p90 / avg)
  in-rank balance    max/mean of the pairs over one rank's slots (uneven experts inside a rank
                     cost grouped-GEMM tiles, even when the ranks are even)
  ranks per token    how many ranks a token's k experts live on
and the critical path: per MoE layer, which rank's experts finished last most often and how
long the others waited for it, on average.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from ...moe.load_stats import aggregate_layers
from .layout import LayerLayout


class PhaseLoads:
    def __init__(self, num_layers: int, ep_size: int) -> None:
        self.num_layers, self.ep_size = num_layers, ep_size
        self.weight = 0.0
        self.pairs = np.zeros(ep_size)
        self.active = np.zeros(ep_size)
        self.rank_bal = np.zeros(num_layers)
        self.expert_bal = np.zeros(num_layers)
        self.bal_weight = np.zeros(num_layers)
        self.in_rank = 0.0
        self.in_rank_weight = 0.0
        self.ranks_per_token = 0.0
        self.critical: list[Counter] = [Counter() for _ in range(num_layers)]
        self.wait_ms = np.zeros(num_layers)
        self.max_pairs = 0.0  # sum over layers and steps of the busiest rank's pairs (for the linear bound)
        self.mean_pairs = 0.0

    def add(self, layer: int, layout: LayerLayout, expert_ms: np.ndarray, weight: float) -> None:
        counts = layout.host_counts()  # [ep, slots]
        pairs = counts.sum(1)  # [ep]
        self.pairs += weight * pairs / self.num_layers
        self.active += weight * (counts > 0).sum(1) / self.num_layers
        self.ranks_per_token += weight * layout.ranks_per_token / self.num_layers
        if pairs.max() > 0:
            self.rank_bal[layer] += weight * pairs.mean() / pairs.max()
            experts = layout.expert_counts.cpu().numpy()
            self.expert_bal[layer] += weight * experts.mean() / max(experts.max(), 1)
            self.bal_weight[layer] += weight
        busy = counts[pairs > 0]
        if len(busy):
            self.in_rank += weight * float((busy.max(1) / busy.mean(1)).mean())
            self.in_rank_weight += weight
        self.critical[layer][int(expert_ms.argmax())] += weight
        self.wait_ms[layer] += weight * float(expert_ms.max() - expert_ms.mean())
        self.max_pairs += weight * float(pairs.max())
        self.mean_pairs += weight * float(pairs.mean())

    def end_step(self, weight: float) -> None:
        self.weight += weight

    def summary(self) -> dict:
        w = max(self.weight, 1e-12)
        bw = np.where(self.bal_weight > 0, self.bal_weight, np.nan)
        rank_bal = [None if np.isnan(v) else float(v) for v in self.rank_bal / bw]
        expert_bal = [None if np.isnan(v) else float(v) for v in self.expert_bal / bw]
        return {
            "pairs_per_rank": (self.pairs / w).tolist(),  # per layer per step
            "active_experts_per_rank": (self.active / w).tolist(),
            "rank_max_over_mean": self.max_pairs / self.mean_pairs if self.mean_pairs else 1.0,
            "balancedness": {"rank": aggregate_layers(rank_bal), "expert": aggregate_layers(expert_bal)},
            "in_rank_expert_max_over_mean": self.in_rank / self.in_rank_weight if self.in_rank_weight else None,
            "ranks_per_token": self.ranks_per_token / w,
            "critical_path": [{"layer": i, "rank": c.most_common(1)[0][0] if c else None,
                               "wait_ms": float(self.wait_ms[i] / w)} for i, c in enumerate(self.critical)],
        }
