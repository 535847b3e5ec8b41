"""`optimal_balanced`: greedy_balanced's balance, chosen to keep as much of the router as it can.

Same guarantee as greedy_balanced: per call (one rank, one layer) every expert receives floor or
ceil of n*k/E (token, expert) pairs. Among all assignments with that balance and k distinct
experts per token, it seeks the one with the highest sum of the router's selection scores over
chosen pairs (softmax routers: the sum of log-probabilities; DeepSeek-V3: sigmoid scores plus
correction bias): a transportation problem, solved on the device by prices and repair moves
(capacity_solver.py). Balance is exact; optimality is approximate, within a fraction of a
percent of an exact LP solver on the tiny eval model (tests/routing/test_capacity_optimality.py
measures the gap).

Why not greedy: LightLLM's rule keeps loads within one at every prefix of the token walk, which
caps what it can keep far below what per-call balance allows (docs/EVAL.md). The router's group
limit is not kept here (exact per-expert balance and a group limit can conflict); rank_balanced
keeps it.
"""
from __future__ import annotations

from .capacity_policy import CapacityPolicy
from .capacity_solver import Capacities
from .context import RoutingContext
from .registry import register_policy


@register_policy("optimal_balanced")
class OptimalBalancedPolicy(CapacityPolicy):
    guarantee = ("per-expert load floor or ceil of N*k/E on each rank, as greedy_balanced; "
                 "maximises the router's summed selection scores (approximately)")

    def capacities(self, n: int, ctx: RoutingContext) -> Capacities:
        return Capacities(width=1, exact=True)
