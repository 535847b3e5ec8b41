"""What `optimal_balanced` and `rank_balanced` share: parameters, the solve, the safety net.

Both solve a capacitated top-k (capacity_solver.py) on the router's selection scores and must
never return an assignment that breaks their balance guarantee. The solver's repair rounds are
a fixed number, so in a rare call they may not finish; the call then returns the closed-form
cyclic assignment below (exactly balanced per expert and per rank, router-blind) instead,
chosen on the device with torch.where: no host sync. `fallback_calls()` counts such calls
(a device counter per device, read only when someone asks), so an evaluation can say how often
it happened.

On CUDA, calls without a group limit or expert cap, of up to capacity_route.MAX_TOKENS tokens,
run as a fixed chain of Triton launches (server/moe/kernels/capacity_route.py: the same prices,
the last pairs moved one least-loss move at a time until balanced, so `repair_rounds` does not
apply there); the others run the torch path.

`keep_bonus` adds that much to the score of each pair the router itself chose, so the objective
becomes (sum of selection scores) + keep_bonus x (router pairs kept). 0 (the default) is the
router's own objective; a bonus above the scores' spread keeps as many router pairs as balance
allows first and uses the scores to decide the rest. On the tiny eval model a bonus of 1 keeps
more pairs at the same perplexity (docs/EVAL.md).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..kernels.capacity_route import capacitated_topk_fused, fused_capacity_applies
from .base import PolicyConfigError, RoutingPolicy
from .capacity_prices import BIG, DAMPING
from .capacity_solver import PRICE_STEPS, REPAIR_ROUNDS, Capacities, capacitated_topk
from .context import RoutingContext
from .group_limit import allowed_by_group_rule, group_keeping_takes
from .group_swap import groups_nest_in_bins


def cyclic_balanced_ids(n: int, num_experts: int, top_k: int, ep_size: int, device: torch.device) -> torch.Tensor:
    """[n, k] int64: slot g = i*k + j takes position g mod E of an order that deals the ranks in
    turn (rank p % ep_size, its (p // ep_size)-th expert). Per call every expert gets floor or
    ceil of n*k/E pairs, every rank floor or ceil of n*k/ep_size, and a token's k consecutive
    positions are distinct experts."""
    per_rank = num_experts // ep_size
    position = torch.arange(n * top_k, device=device, dtype=torch.int64) % num_experts  # [n*k]
    return ((position % ep_size) * per_rank + position // ep_size).view(n, top_k)


def non_negative_int(key: str, value: Any, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PolicyConfigError(f"routing.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def finite_number(key: str, value: Any, minimum: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not minimum <= value < math.inf:
        raise PolicyConfigError(f"routing.{key} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


class CapacityPolicy(RoutingPolicy):
    """Base of the capacity-solving policies; subclasses say which capacities a call has."""

    wants_selection_scores = True

    def __init__(self, weights: str = "keep", seed: int = 0, keep_bonus: float = 0.0, price_steps: int = PRICE_STEPS,
                 repair_rounds: int = REPAIR_ROUNDS) -> None:
        super().__init__(weights=weights, seed=seed)
        self.keep_bonus = finite_number("keep_bonus", keep_bonus, 0.0)
        self.price_steps = non_negative_int("price_steps", price_steps)
        self.repair_rounds = non_negative_int("repair_rounds", repair_rounds)
        self._fallbacks: dict[torch.device, torch.Tensor] = {}  # device -> [1] int64; one per device

    def params(self) -> dict[str, Any]:
        return {**super().params(), "keep_bonus": self.keep_bonus, "price_steps": self.price_steps,
                "repair_rounds": self.repair_rounds}

    def capacities(self, n: int, ctx: RoutingContext) -> Capacities:
        raise NotImplementedError

    def steps(self, ctx: RoutingContext) -> int:
        """Price steps of a call in `ctx` (a subclass may choose by the call's kind)."""
        return self.price_steps

    def keeps_groups(self) -> bool:
        """Whether this policy keeps the router's group limit (when the router has one)."""
        return False

    def fallback_calls(self) -> int:
        """Calls so far that returned the closed-form fallback (a host read: call it off the hot path)."""
        return int(sum(int(c.item()) for c in self._fallbacks.values()))

    def objective_scores(self, topk_ids: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """[n, E] what this policy maximises the sum of: selection scores, plus keep_bonus on the
        router's own pairs."""
        if not self.keep_bonus:
            return router_logits
        bonus = torch.full(topk_ids.shape, self.keep_bonus, device=router_logits.device)  # [n, k]
        return router_logits.float().scatter_add(1, topk_ids.long(), bonus)

    def solver(self, n: int, ctx: RoutingContext) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """scores [n, E] -> (ids [n, k] int64, ok 0-d bool) for a call of n tokens in `ctx`. It
        reads only the shape of the call (n, E, k, ep_size, the router's group limit), never the
        rank, layer or token offset: calls that agree on those may share one batched solve."""
        capacities = self.capacities(n, ctx)
        allowed_fn = take_filter = swap_groups = None
        if self.keeps_groups() and ctx.router_groups > 1:
            groups, topk_groups, num_experts = ctx.router_groups, ctx.router_topk_groups, ctx.num_experts

            def allowed_fn(adjusted):
                return allowed_by_group_rule(adjusted, groups, topk_groups)

            def take_filter(held, ids, giving):
                return group_keeping_takes(ids, giving, num_experts, groups, topk_groups)

            if capacities.width > 1 and groups_nest_in_bins(num_experts, groups, capacities.width):
                swap_groups = groups

        fused = self.fused_batch(n, ctx)

        def solve(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if fused is not None and scores.is_cuda:
                ids, ok = fused(scores[None])  # [1, n, k], [1]
                return ids[0], ok[0]
            return capacitated_topk(scores, ctx.top_k, capacities, allowed_fn, take_filter, self.steps(ctx),
                                    self.repair_rounds, swap_groups)

        return solve

    def fused_batch(self, n: int, ctx: RoutingContext) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """scores [R, n, E] -> (ids [R, n, k] int32, ok [R] bool) through the fused Triton
        chain, or None where that chain does not take the call (a group limit kept, an
        expert cap, a shape it does not cover)."""
        capacities = self.capacities(n, ctx)
        if (self.keeps_groups() and ctx.router_groups > 1) or capacities.expert_ceiling is not None \
                or not fused_capacity_applies(n, ctx.num_experts, ctx.top_k, capacities.width):
            return None

        def solve_batch(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            clean = scores.float().nan_to_num(nan=-BIG / 4).clamp(-BIG / 4, BIG / 4)  # as capacitated_topk
            return capacitated_topk_fused(clean, ctx.top_k, capacities.width, capacities.exact, capacities.ceiling,
                                          self.steps(ctx), DAMPING)

        return solve_batch

    def guarded(self, ids: torch.Tensor, ok: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """ids [..., n, k], ok [...] bool -> [..., n, k] int32: the solver's ids where every
        capacity held, else the closed-form fallback; counts the fallbacks on the device."""
        n, device = ids.shape[-2], ids.device
        fallback = cyclic_balanced_ids(n, ctx.num_experts, ctx.top_k, ctx.ep_size, device)  # [n, k]
        counter = self._fallbacks.get(device)
        if counter is None:
            counter = self._fallbacks[device] = torch.zeros(1, dtype=torch.int64, device=device)
        counter += (~ok).to(torch.int64).sum()
        return torch.where(ok[..., None, None], ids, fallback).to(torch.int32)

    def route(self, topk_ids, topk_weights, router_logits, ctx: RoutingContext) -> torch.Tensor:
        n, device = router_logits.shape[0], router_logits.device
        if n == 0:
            return torch.empty(0, ctx.top_k, dtype=torch.int32, device=device)
        ids, ok = self.solver(n, ctx)(self.objective_scores(topk_ids, router_logits))  # [n, k], 0-d bool
        return self.guarded(ids, ok, ctx)

    def call_ranks(self, calls):
        """Calls of the same shape (shape_key) run as one solve: on CUDA where the fused kernel
        takes the shape, one launch with a program per call; else under torch.func.vmap, the
        same ops on a leading batch dimension, so R ranks cost one call's kernel launches, not R
        times as many. The ids equal the one-call path's (tests/routing/test_capacity_batched.py)."""
        out: list = [None] * len(calls)
        by_shape: dict[tuple, list[int]] = {}
        for i, (_, _, logits, ctx) in enumerate(calls):
            by_shape.setdefault(shape_key(logits.shape[0], ctx), []).append(i)
        for members in by_shape.values():
            first = calls[members[0]]
            if len(members) == 1 or first[2].shape[0] == 0:
                for i in members:
                    out[i] = self(*calls[i])
                continue
            scores = torch.stack([self.objective_scores(calls[i][0], calls[i][2]) for i in members])  # [R, n, E]
            n, ctx = first[2].shape[0], first[3]
            fused = self.fused_batch(n, ctx) if scores.is_cuda else None
            if fused is not None:
                ids, ok = fused(scores)  # one launch, a program per rank
            else:
                ids, ok = torch.func.vmap(self.solver(n, ctx))(scores)  # [R, n, k], [R]
            ids = self.guarded(ids, ok, first[3])
            for row, i in enumerate(members):
                out[i] = (ids[row], self.weigh(calls[i][1], calls[i][3]))
        return out


def shape_key(n: int, ctx: RoutingContext) -> tuple:
    """What a capacity solve depends on besides the scores (CapacityPolicy.solver)."""
    return (n, ctx.num_experts, ctx.top_k, ctx.ep_size, ctx.router_groups, ctx.router_topk_groups)
