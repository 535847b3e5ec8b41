"""`skewed`: controlled imbalance with a target per-expert max/mean load.

Each expert e gets an inclusion probability p[e] (sum k, each <= 1) from a popularity profile:
  * `zipf`: p[e] proportional to (popularity rank + 1) ** -s, with s solved so that
    max(p) / mean(p) equals `target`; which expert holds which rank is a seeded shuffle per layer.
  * `hot_ranks`: the experts of `hot_ranks` seeded ranks share a raised probability with
    max/mean = `target`, the others share the rest evenly.
Tokens then draw k distinct experts by systematic sampling: with cumulative sums C of p,
token i takes the experts whose interval [C[e-1], C[e]) holds u_i, u_i + 1, ..., u_i + k - 1.
That gives exact inclusion probabilities and k distinct experts (each p[e] <= 1). u_i is a
golden-ratio sequence over the global token index, so measured loads track N * p[e] closely
(max/mean within a few percent of the target at N >= 4096) without any generator state.
"""
from __future__ import annotations

import random

import torch

from .base import PolicyConfigError, RoutingPolicy
from .context import RoutingContext
from .hashing import stream_key
from .registry import register_policy

MODES = ("zipf", "hot_ranks")
_GOLDEN = 0.6180339887498949


def zipf_probabilities(num_experts: int, top_k: int, target: float) -> list[float]:
    """Inclusion probabilities by popularity rank with max/mean == target (bisection on s)."""
    def ratio(s: float) -> float:
        w = [(r + 1) ** -s for r in range(num_experts)]
        return w[0] * num_experts / sum(w)

    lo, hi = 0.0, 64.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) < target else (lo, mid)
    w = [(r + 1) ** -lo for r in range(num_experts)]
    total = sum(w)
    return [top_k * x / total for x in w]


def hot_rank_probabilities(num_experts: int, top_k: int, ep_size: int, hot_ranks: int, target: float, hot: list[int]) -> list[float]:
    per_rank = num_experts // ep_size
    n_hot = hot_ranks * per_rank
    p_hot = target * top_k / num_experts
    p_cold = (top_k - n_hot * p_hot) / (num_experts - n_hot) if num_experts > n_hot else 0.0
    hot_set = set(hot)
    return [p_hot if e // per_rank in hot_set else p_cold for e in range(num_experts)]


@register_policy("skewed")
class SkewedPolicy(RoutingPolicy):
    guarantee = "the imbalance you ask for: per-expert max/mean = target"

    def __init__(self, weights: str = "keep", seed: int = 0, target: float = 2.0, mode: str = "zipf", hot_ranks: int = 1) -> None:
        super().__init__(weights=weights, seed=seed)
        if mode not in MODES:
            raise PolicyConfigError(f"routing.mode must be one of {MODES}, got {mode!r}")
        if not isinstance(target, (int, float)) or target < 1.0:
            raise PolicyConfigError(f"routing.target (per-expert max/mean) must be >= 1.0, got {target!r}")
        if not isinstance(hot_ranks, int) or hot_ranks < 1:
            raise PolicyConfigError(f"routing.hot_ranks must be a positive integer, got {hot_ranks!r}")
        self.target = float(target)
        self.mode = mode
        self.hot_ranks = hot_ranks
        # (layer, E, k, ep, seed, device) -> cumulative probabilities [E] float64; bounded by model shape.
        self._cumulative: dict[tuple, torch.Tensor] = {}

    def params(self) -> dict:
        return {**super().params(), "target": self.target, "mode": self.mode, "hot_ranks": self.hot_ranks}

    def validate(self, num_experts: int, top_k: int, ep_size: int, num_layers: int | None = None) -> None:
        if self.target * top_k / num_experts > 1.0 + 1e-9:
            raise PolicyConfigError(
                f"routing.target={self.target} is unreachable with {num_experts} experts and top-k {top_k}: "
                f"the hottest expert would need more than every token (max target is E/k = {num_experts / top_k:g})"
            )
        if self.mode == "hot_ranks":
            if self.hot_ranks >= ep_size:
                raise PolicyConfigError(
                    f"routing.hot_ranks={self.hot_ranks} must be smaller than parallel.ep_size={ep_size} "
                    "(with every rank hot there is no skew across ranks)"
                )
            if self.target > ep_size / self.hot_ranks + 1e-9:
                raise PolicyConfigError(
                    f"routing.target={self.target} is unreachable with hot_ranks={self.hot_ranks} of ep_size={ep_size}: "
                    f"max is ep_size/hot_ranks = {ep_size / self.hot_ranks:g}"
                )

    def probabilities(self, ctx: RoutingContext) -> list[float]:
        """Per-expert inclusion probability for this layer (sums to k)."""
        self.validate(ctx.num_experts, ctx.top_k, ctx.ep_size)
        rng = random.Random(stream_key(self.seed, ctx.seed, ctx.layer))
        if self.mode == "zipf":
            by_rank = zipf_probabilities(ctx.num_experts, ctx.top_k, self.target)
            experts = list(range(ctx.num_experts))
            rng.shuffle(experts)  # experts[r] holds popularity rank r
            p = [0.0] * ctx.num_experts
            for r, e in enumerate(experts):
                p[e] = by_rank[r]
            return p
        ranks = list(range(ctx.ep_size))
        rng.shuffle(ranks)
        return hot_rank_probabilities(ctx.num_experts, ctx.top_k, ctx.ep_size, self.hot_ranks, self.target, ranks[: self.hot_ranks])

    def _cumulative_for(self, ctx: RoutingContext, device: torch.device) -> torch.Tensor:
        key = (ctx.layer, ctx.num_experts, ctx.top_k, ctx.ep_size, ctx.seed, device)
        cum = self._cumulative.get(key)
        if cum is None:
            p = torch.tensor(self.probabilities(ctx), dtype=torch.float64)
            cum = torch.cumsum(p, 0)
            cum = cum * (ctx.top_k / cum[-1])  # exact total k despite rounding
            cum[-1] = float(ctx.top_k) + 1.0  # the last expert closes the range
            cum = cum.to(device)
            self._cumulative[key] = cum
        return cum

    def route(self, topk_ids, topk_weights, router_logits, ctx: RoutingContext) -> torch.Tensor:
        n, k, device = topk_ids.shape[0], ctx.top_k, topk_ids.device
        cum = self._cumulative_for(ctx, device)  # [E] float64
        shift = stream_key(self.seed, ctx.seed, ctx.layer, 7) / 2**32
        token = torch.arange(n, device=device, dtype=torch.float64) + ctx.token_offset  # [N]
        u = torch.frac(token * _GOLDEN + shift)  # [N] in [0, 1)
        points = u[:, None] + torch.arange(k, device=device, dtype=torch.float64)  # [N, k]
        ids = torch.searchsorted(cum, points, right=True)  # [N, k]
        return ids.clamp_(max=ctx.num_experts - 1).to(torch.int32)
