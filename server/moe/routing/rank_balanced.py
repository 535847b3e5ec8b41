"""`rank_balanced`: balance the EP ranks only, and keep far more of the router's choice.

An EP step waits for its busiest rank, and a rank computes all of its E/ep_size experts, so the
rank loads are what balance must fix; expert loads inside a rank may stay as the router wants.
Per call each rank receives floor or ceil of n*k/ep_size pairs (`tolerance` t > 0: at most
max(ceil, floor((1+t) * n*k/ep_size))), maximising the router's summed selection scores
(capacity_solver.py, with one bin per rank). Far fewer constraints than per-expert balance:
on the tiny eval model at EP4 it keeps about 0.69 of the router's pairs against 0.51.

* `expert_cap` (optional, >= 1): no expert receives more than ceil(expert_cap * n*k/E) pairs.
  Uneven experts inside a rank cost grouped-GEMM efficiency (padding, the busiest expert), so a
  small cap may buy back speed that rank-only balance gives up.
* Group-limited routers (DeepSeek-V3's n_group/topk_group, told by the routing context): a
  token's experts stay within topk_group groups. Prices steer whole groups through the router's
  own group rule, repair moves never open a group past the limit, and where groups lie inside
  ranks (DeepSeek-V2 at EP8) whole-group moves carry a token's experts from one rank to
  another. Where a token can only move whole groups that span ranks (topk_group = 1 with a
  group over two ranks, in small synthetic layouts) the call may fall back;
  tests/routing/test_capacity_groups.py lists both kinds of layout.
Rank balance is the hard guarantee: the closed-form fallback (capacity_policy.py) keeps it even
in a call where the repair did not finish, at the price of the group limit in that call (its
per-expert balance stays within any expert cap; fallback_calls() counts such calls). Some calls
cannot have both: one token at EP8 has 8 pairs for 8 ranks, which DeepSeek-V3's limit of 4
groups (one per rank at EP8) cannot reach.
"""
from __future__ import annotations

import math
from typing import Any

from .capacity_policy import CapacityPolicy, finite_number
from .capacity_solver import PRICE_STEPS, REPAIR_ROUNDS, Capacities
from .context import RoutingContext
from .registry import register_policy


@register_policy("rank_balanced")
class RankBalancedPolicy(CapacityPolicy):
    guarantee = ("per-rank load floor or ceil of N*k/ep_size on each rank (tolerance t: at most (1+t) x the share); "
                 "expert loads inside a rank free (or capped); keeps the router's group limit")

    def __init__(self, weights: str = "keep", seed: int = 0, tolerance: float = 0.0, expert_cap: float | None = None,
                 keep_bonus: float = 0.0, price_steps: int = PRICE_STEPS, repair_rounds: int = REPAIR_ROUNDS) -> None:
        super().__init__(weights=weights, seed=seed, keep_bonus=keep_bonus, price_steps=price_steps,
                         repair_rounds=repair_rounds)
        self.tolerance = finite_number("tolerance", tolerance, 0.0)
        self.expert_cap = None if expert_cap is None else finite_number("expert_cap", expert_cap, 1.0)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "tolerance": self.tolerance, "expert_cap": self.expert_cap}

    def keeps_groups(self) -> bool:
        return True

    def capacities(self, n: int, ctx: RoutingContext) -> Capacities:
        pairs = n * ctx.top_k
        share = pairs / ctx.ep_size
        ceiling = max(-(-pairs // ctx.ep_size), math.floor((1 + self.tolerance) * share + 1e-9))
        expert_ceiling = None
        if self.expert_cap is not None:
            expert_ceiling = max(1, math.ceil(self.expert_cap * pairs / ctx.num_experts - 1e-9))
        return Capacities(width=ctx.experts_per_rank, exact=self.tolerance == 0.0, ceiling=ceiling,
                          expert_ceiling=expert_ceiling)
