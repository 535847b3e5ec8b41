"""`skewed`: controlled imbalance with a target metric.

Each expert e gets an inclusion probability p[e] (sum k, each <= 1) from a popularity profile:
  * `zipf`: p[e] proportional to (popularity rank + 1) ** -s; which expert holds which rank is
    a seeded shuffle per layer;
  * `lognormal`: p[e] proportional to exp(s * z_e), z_e seeded standard normal draws per layer
    (DeepEP's measurement of real routing found log-normal popularity the best fit);
  * `power_law`: p[e] proportional to a draw from x ** -s on [1, 3276.8] (AIConfigurator's
    expert-load model, s its alpha);
  * `hot_ranks`: the experts of `hot_ranks` seeded ranks share a raised probability, the others
    share the rest evenly.
The shape s is solved so the expected loads read `target` in the chosen `metric`: per-expert
max/mean (the default), MaxVio ((max - mean)/mean per expert), or rank balancedness (mean/max
of the per-EP-rank load); skew_profiles.py. With `shape` set the profile's shape is used as
given (a published alpha, say) and `target` is not solved. Tokens then draw k distinct experts by systematic
sampling: with cumulative sums C of p, token i takes the experts whose interval
[C[e-1], C[e]) holds u_i, u_i + 1, ..., u_i + k - 1. That gives exact inclusion probabilities
and k distinct experts (each p[e] <= 1). u_i is a golden-ratio sequence over the global token
index, so measured loads track N * p[e] closely (within a few percent of the target at
N >= 4096) without any generator state: deterministic per layer and EP rank.
"""
from __future__ import annotations

import math
import random

import torch

from .base import PolicyConfigError, RoutingPolicy
from .context import RoutingContext
from .hashing import stream_key
from .registry import register_policy
from .skew_profiles import PROFILES, S_MAX, inclusion_probabilities, solve_profile, target_imbalance

MODES = ("zipf", "hot_ranks", "lognormal", "power_law")
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
    guarantee = "the imbalance you ask for: target in its metric (per-expert max/mean, MaxVio or rank balancedness)"

    def __init__(self, weights: str = "keep", seed: int = 0, target: float = 2.0, mode: str = "zipf", hot_ranks: int = 1,
                 metric: str = "expert_max_over_mean", shape: float | None = None) -> None:
        super().__init__(weights=weights, seed=seed)
        if mode not in MODES:
            raise PolicyConfigError(f"routing.mode must be one of {MODES}, got {mode!r}")
        if not isinstance(target, (int, float)) or isinstance(target, bool) or not math.isfinite(target):
            raise PolicyConfigError(f"routing.target must be a finite number, got {target!r}")
        if not isinstance(hot_ranks, int) or isinstance(hot_ranks, bool) or hot_ranks < 1:
            raise PolicyConfigError(f"routing.hot_ranks must be a positive integer, got {hot_ranks!r}")
        if shape is not None and (not isinstance(shape, (int, float)) or isinstance(shape, bool) or not 0 <= shape <= S_MAX
                                  or mode == "hot_ranks"):
            raise PolicyConfigError(f"routing.shape must be a number in [0, {S_MAX:g}] for mode zipf, lognormal or "
                                    f"power_law (used as given instead of solving routing.target), got {shape!r}")
        self.shape = None if shape is None else float(shape)  # a profile's own shape: `target` is not solved
        self.goal = target_imbalance(metric, float(target))  # the target as a max/mean
        self.target = float(target)
        self.metric = metric
        self.mode = mode
        self.hot_ranks = hot_ranks
        # (layer, E, k, ep, seed) -> probabilities; (.., device) -> cumulative [E] float64; bounded by model shape.
        self._probabilities: dict[tuple, list[float]] = {}
        self._cumulative: dict[tuple, torch.Tensor] = {}

    def params(self) -> dict:
        return {**super().params(), "target": self.target, "mode": self.mode, "hot_ranks": self.hot_ranks,
                "metric": self.metric, **({} if self.shape is None else {"shape": self.shape})}

    def validate(self, num_experts: int, top_k: int, ep_size: int, num_layers: int | None = None) -> None:
        expert_limit = num_experts / top_k  # the hottest expert cannot take more than every token
        if self.metric != "rank_balancedness" and self.goal > expert_limit + 1e-9:
            raise PolicyConfigError(
                f"routing.target={self.target} ({self.metric}) is unreachable with {num_experts} experts and top-k "
                f"{top_k}: the hottest expert would need more than every token (max per-expert max/mean is "
                f"E/k = {expert_limit:g})")
        if self.metric == "rank_balancedness":
            rank_limit = min(top_k, num_experts // ep_size) * ep_size / top_k
            if self.goal > rank_limit + 1e-9:
                raise PolicyConfigError(
                    f"routing.target={self.target} (rank balancedness) is unreachable at ep_size={ep_size} with "
                    f"top-k {top_k}: the lowest is {1 / rank_limit:g} (every token's experts on one rank)")
        if self.mode == "hot_ranks":
            if self.hot_ranks >= ep_size:
                raise PolicyConfigError(
                    f"routing.hot_ranks={self.hot_ranks} must be smaller than parallel.ep_size={ep_size} "
                    "(with every rank hot there is no skew across ranks)")
            if self.goal > ep_size / self.hot_ranks + 1e-9:
                raise PolicyConfigError(
                    f"routing.target={self.target} is unreachable with hot_ranks={self.hot_ranks} of ep_size={ep_size}: "
                    f"max rank max/mean is ep_size/hot_ranks = {ep_size / self.hot_ranks:g}")
        elif num_layers is not None and self.shape is None:  # solve every layer now: an unreachable one fails at start-up
            for layer in range(num_layers):
                self.probabilities(RoutingContext(layer=layer, num_experts=num_experts, top_k=top_k, ep_size=ep_size))

    def probabilities(self, ctx: RoutingContext) -> list[float]:
        """Per-expert inclusion probability for this layer (sums to k)."""
        key = (ctx.layer, ctx.num_experts, ctx.top_k, ctx.ep_size, ctx.seed)
        p = self._probabilities.get(key)
        if p is None:
            p = self._solve(ctx)
            self._probabilities[key] = p
        return p

    def _solve(self, ctx: RoutingContext) -> list[float]:
        rng = random.Random(stream_key(self.seed, ctx.seed, ctx.layer))
        if self.mode == "hot_ranks":
            self.validate(ctx.num_experts, ctx.top_k, ctx.ep_size)
            ranks = list(range(ctx.ep_size))
            rng.shuffle(ranks)
            return hot_rank_probabilities(ctx.num_experts, ctx.top_k, ctx.ep_size, self.hot_ranks, self.goal,
                                          ranks[: self.hot_ranks])
        weights_at = PROFILES[self.mode](rng, ctx.num_experts)
        if self.shape is not None:
            return inclusion_probabilities(weights_at(self.shape), ctx.top_k)
        return solve_profile(weights_at, ctx.top_k, ctx.ep_size, self.metric, self.goal,
                             f"MoE layer {ctx.layer} ({self.mode}, {ctx.num_experts} experts, top-k {ctx.top_k}, "
                             f"ep_size {ctx.ep_size})")

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
