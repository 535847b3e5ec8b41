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
* `price_steps` (default: auto): 5 for exact shares (tolerance 0) without a group limit or
  expert cap, 20 for the others. Measured on one H100 (BENCHMARKS.md section 2), 5 steps cost
  2.4-3.5x less than 20 on the GPU chain at 128 and 8,192 tokens and E = 128 and 256, and
  on the tiny eval model (docs/EVAL.md) they keep the same pairs (fidelity 0.695, 0.00% gap to
  the exact optimum, perplexity 3.990 against 3.988). With a group limit the steps settle the
  groups as well, and fewer left calls no single move could finish (capacity_prices.py); with
  an expert cap the repair rounds must also drain the experts; with a tolerance the prices only
  ever rise, and at 5 steps the torch path's repair rounds left a 2% gap to the optimum on
  random calls (tests/routing/test_capacity_optimality.py holds it under 1%). Those keep 20.
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

FREE_PRICE_STEPS = 5  # price_steps=None: exact shares without a group limit or expert cap


@register_policy("rank_balanced")
class RankBalancedPolicy(CapacityPolicy):
    guarantee = ("per-rank load floor or ceil of N*k/ep_size on each rank (tolerance t: at most (1+t) x the share); "
                 "expert loads inside a rank free (or capped); keeps the router's group limit")

    def __init__(self, weights: str = "keep", seed: int = 0, tolerance: float = 0.0, expert_cap: float | None = None,
                 keep_bonus: float = 0.0, price_steps: int | None = None, repair_rounds: int = REPAIR_ROUNDS) -> None:
        super().__init__(weights=weights, seed=seed, keep_bonus=keep_bonus,
                         price_steps=PRICE_STEPS if price_steps is None else price_steps, repair_rounds=repair_rounds)
        self.auto_steps = price_steps is None
        self.tolerance = finite_number("tolerance", tolerance, 0.0)
        self.expert_cap = None if expert_cap is None else finite_number("expert_cap", expert_cap, 1.0)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "tolerance": self.tolerance, "expert_cap": self.expert_cap,
                "price_steps": None if self.auto_steps else self.price_steps}

    def steps(self, ctx: RoutingContext) -> int:
        if self.auto_steps and self.tolerance == 0.0 and ctx.router_groups <= 1 and self.expert_cap is None:
            return FREE_PRICE_STEPS
        return self.price_steps

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
