"""`round_robin_balanced`: a closed-form balanced assignment, rank-aware.

Global slot g = (token_offset + i) * k + j (token i of this rank, slot j) walks a cyclic
order of the experts: ids[i, j] = order[(start + g) % E]. The slots of one step, over all EP
ranks, form one contiguous range of g, so every expert's load summed over the ranks is
floor(S/E) or one more (S = total slots in the step), whatever the per-rank token counts.

`order` interleaves the ranks: position p belongs to rank p % ep_size (rank r owns experts
[r*E/ep, (r+1)*E/ep)), so any contiguous run of slots also spreads evenly over ranks: per-rank
loads differ by at most one, and no rank idles even when ep_size > k or a step has fewer
tokens than ranks. Within a rank the local experts follow a seeded affine permutation, and
the cycle starts at a seeded offset per layer, so layers do not all favour the same experts.

Cost: with an int token_offset the ids are a view of a cached periodic table (the order
repeated): no kernel at all. Like every policy output, the ids are read-only for callers. The table grows
geometrically up to the largest N seen (bounded, never keyed by N). A 0-d tensor offset
(CUDA-graph replay reads its current value) takes the arithmetic path instead.
"""
from __future__ import annotations

from math import gcd

import torch

from .base import RoutingPolicy
from .context import RoutingContext
from .hashing import stream_key
from .registry import register_policy


def interleaved_order(num_experts: int, ep_size: int, key: int) -> list[int]:
    """Cyclic expert order whose consecutive positions rotate over the EP ranks."""
    per_rank = num_experts // ep_size
    mult = 1 + 2 * (key % max(per_rank, 1))
    while gcd(mult, per_rank) != 1:
        mult += 1
    shift = (key >> 12) % per_rank
    return [
        (p % ep_size) * per_rank + (mult * (p // ep_size) + shift) % per_rank
        for p in range(num_experts)
    ]


@register_policy("round_robin_balanced")
class RoundRobinBalancedPolicy(RoutingPolicy):
    guarantee = "per-expert load within ±1 summed over EP ranks; per-rank load within ±1"

    def __init__(self, weights: str = "keep", seed: int = 0) -> None:
        super().__init__(weights=weights, seed=seed)
        # (layer, E, ep, seed, device) -> order[E] int32 and the order repeated (periodic
        # table). Bounded by the model's shape; tables grow only to the largest N seen.
        self._orders: dict[tuple, torch.Tensor] = {}
        self._tables: dict[tuple, torch.Tensor] = {}

    def _order(self, ctx: RoutingContext, device: torch.device) -> tuple[torch.Tensor, int]:
        key = stream_key(self.seed, ctx.seed, ctx.layer)
        cache_key = (ctx.layer, ctx.num_experts, ctx.ep_size, ctx.seed, device)
        order = self._orders.get(cache_key)
        if order is None:
            order = torch.tensor(
                interleaved_order(ctx.num_experts, ctx.ep_size, key), dtype=torch.int32, device=device
            )
            self._orders[cache_key] = order
        start = (key >> 20) % ctx.num_experts
        return order, start

    def _table(self, ctx: RoutingContext, order: torch.Tensor, slots: int) -> torch.Tensor:
        cache_key = (ctx.layer, ctx.num_experts, ctx.ep_size, ctx.seed, order.device)
        table = self._tables.get(cache_key)
        if table is None or table.numel() < slots + ctx.num_experts:
            reps = -(-(2 * slots + ctx.num_experts) // ctx.num_experts)
            table = order.repeat(reps)  # [reps * E] int32: order, order, order, ...
            self._tables[cache_key] = table
        return table

    def route(self, topk_ids, topk_weights, router_logits, ctx: RoutingContext) -> torch.Tensor:
        n, k = topk_ids.shape[0], ctx.top_k
        order, start = self._order(ctx, topk_ids.device)  # order: [E] int32
        base = ctx.token_offset * k + start  # int, or 0-d tensor under CUDA graphs
        if isinstance(base, int):
            first = base % ctx.num_experts
            return self._table(ctx, order, n * k)[first:first + n * k].view(n, k)  # [N, k] int32, read-only view
        slots = torch.arange(n * k, device=topk_ids.device, dtype=torch.int64)  # [N*k]
        slots = (slots + base) % ctx.num_experts
        return order[slots].view(n, k)  # [N, k] int32
