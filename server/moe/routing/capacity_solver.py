"""Capacitated top-k: each token takes k distinct experts, each bin of experts takes at most its
capacity, and the sum of the router's scores over chosen pairs is as high as we can make it.

One function serves both policies: `optimal_balanced` (bins = single experts, exact shares) and
`rank_balanced` (bins = the experts of one EP rank, exact shares or a tolerance). Steps, all on
the device, the same fixed work in every call (no host sync, CUDA-graph safe):

  1. bin prices by damped Jacobi steps (capacity_prices.py), and expert prices too under an
     expert ceiling;
  2. each token's top-k of (score - price of the expert's bin [- its own]), within its allowed experts
     (under a group limit: the groups it picked while the prices settled);
  3. exact shares: the bins with the most pairs get the ceil share, the rest the floor share;
  4. repair rounds: single-pair moves that lose least (capacity_repair.py);
  5. a device flag saying whether every capacity holds; the policy falls back on it.
Ids come back ordered by the router's score, best first, so that `weights=keep` gives the
router's largest weight to the best expert the token kept.

Tensors made inside the solve are written out of place (`scatter`, not `scatter_`): the what-if
runs every rank's call as one solve under torch.func.vmap (CapacityPolicy.call_ranks), which
cannot write a batched value into a fresh unbatched tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .capacity_prices import BIG, expert_bins, solve_bin_prices
from .capacity_repair import TakeFilter, bin_loads, repair

PRICE_STEPS = 20
REPAIR_ROUNDS = 16


@dataclass(frozen=True)
class Capacities:
    """Bins of `width` consecutive experts and what each may receive in one call.

    exact: shares are floor or ceil of pairs/bins (cap = the floor share; which bins get one more
    is decided from the priced assignment); otherwise `ceiling` pairs per bin, slack allowed.
    expert_ceiling: optional per-expert ceiling inside the bins."""

    width: int
    exact: bool
    ceiling: int = 0
    expert_ceiling: int | None = None


def exact_caps(load: torch.Tensor, floor_share: int, extra: int) -> torch.Tensor:
    """load [B] -> cap [B] int64: floor_share each, plus one for the `extra` most loaded bins."""
    order = torch.argsort(load, descending=True, stable=True)  # [B]
    bonus = torch.zeros_like(load).index_fill(0, order[:extra], 1)  # not `bonus[...] = 1`: a host scalar, no graph capture
    return floor_share + bonus


def order_by_score(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """ids [n, k] -> the same ids per token, highest score first (ties: lower id)."""
    ids = ids.sort(dim=1).values  # a stable descending sort below keeps lower ids first on ties
    order = scores.gather(1, ids).argsort(dim=1, descending=True, stable=True)  # [n, k]
    return ids.gather(1, order)


def capacitated_topk(scores: torch.Tensor, top_k: int, capacities: Capacities,
                     allowed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     take_filter: TakeFilter | None = None, price_steps: int = PRICE_STEPS,
                     repair_rounds: int = REPAIR_ROUNDS, swap_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [n, E] -> (ids [n, k] int64 ordered by score, ok 0-d bool: every capacity holds).
    swap_groups: the router's group count when its groups lie inside bins (whole-group moves)."""
    n, num_experts = scores.shape
    width = capacities.width
    bins = num_experts // width
    scores = scores.float().nan_to_num(nan=-BIG / 4).clamp(-BIG / 4, BIG / 4)  # [n, E]
    if capacities.exact:
        floor_share, extra = divmod(n * top_k, bins)
        price_cap = torch.full((bins,), floor_share, dtype=torch.int64, device=scores.device)
        max_cap = floor_share + 1
    else:
        price_cap = torch.full((bins,), capacities.ceiling, dtype=torch.int64, device=scores.device)
        max_cap = capacities.ceiling
    price, expert_price, allowed = solve_bin_prices(
        scores, top_k, width, price_cap, max_cap, price_steps, upper_only=not capacities.exact, allowed_fn=allowed_fn,
        expert_cap=capacities.expert_ceiling)  # [B], [E] | None, [n, E] | None
    adjusted = scores - price[expert_bins(num_experts, width, scores.device)]  # [n, E]
    if expert_price is not None:
        adjusted = adjusted - expert_price
    if allowed is not None:
        adjusted = torch.where(allowed, adjusted, torch.full_like(adjusted, -BIG))
    ids = adjusted.topk(top_k, dim=1).indices  # [n, k]
    cap = exact_caps(bin_loads(ids, width, bins), floor_share, extra) if capacities.exact else price_cap  # [B]
    expert_cap = None
    if capacities.expert_ceiling is not None:
        expert_cap = torch.full((num_experts,), capacities.expert_ceiling, dtype=torch.int64, device=scores.device)
    ids = repair(scores, ids, width, cap, repair_rounds, take_filter, expert_cap, swap_groups)
    ok = (bin_loads(ids, width, bins) <= cap).all()
    if expert_cap is not None:
        ok = ok & (bin_loads(ids, 1, num_experts) <= expert_cap).all()
    return order_by_score(ids, scores), ok
