"""Bin prices that make every token's own top-k respect bin capacities: the dual half of the
capacitated assignment behind `optimal_balanced` and `rank_balanced`.

The problem: n tokens each choose k distinct experts; experts are split into B equal bins of w
consecutive experts (w = 1: each expert its own bin; w = E/ep_size: one bin per EP rank); bin b
may receive at most cap[b] (token, expert) pairs. Maximise the sum of the router's scores over
chosen pairs. It is a transportation problem, and its LP dual gives one price per bin: with the
right prices, each token's top-k of (score - price of the expert's bin) is an optimal
assignment, up to ties at the margin. So we look for prices, not for an assignment.

How: Jacobi coordinate ascent, the parallel form of an auction. With every other price fixed,
token i takes j experts of bin b exactly when price[b] < tau[i, b, j] := (its j-th best score
in b) - (the (k-j+1)-th best adjusted score outside b); tau falls with j. So the price at which
bin b receives exactly cap[b] pairs lies between the cap[b]-th and (cap[b]+1)-th largest tau over
(i, j). Every bin moves 85 % of the way there at once (the full step overshoots: bins that
share tokens all move together; 0.5 and 0.7 converge slower on the tiny model's calls and on
skewed random ones at E = 128 and 256). Each step is a few dense tensor ops, no host sync,
fixed count: the same work in every call, so a CUDA graph can hold it. On the tiny eval model
20 steps leave under one pair in 2048 over capacity; at E=256, k=8, n=8192 a dozen or so (the
repair, capacity_repair.py, moves those).

`allowed` restricts which experts a token may use (group-limited routing, group_limit.py):
disallowed scores are treated as absent.
"""
from __future__ import annotations

from typing import Callable

import torch

#: stands in for +/- infinity in threshold arithmetic (scores are O(10); no nan from inf - inf)
BIG = 1.0e9
DAMPING = 0.85  # fraction of the way to each bin's target price per step
#: the same under a group limit: a token's response jumps when it switches groups, and larger
#: steps then keep prices oscillating (measured at E=64, 8 groups, 4 used, top-8, EP8)
GROUPED_DAMPING = 0.5
#: the same with expert prices beside the bin prices (an expert ceiling): the two sets answer each
#: other, and at 0.85 they settled 2-18% of balance's cost from the optimum on the tiny eval model
#: at caps of 2 to 1.25, at 0.5 within 0.2-3.8%
NESTED_DAMPING = 0.5


def expert_bins(num_experts: int, width: int, device: torch.device) -> torch.Tensor:
    """[E] int64 bin of each expert (a gather index: no data-dependent output size)."""
    return torch.arange(num_experts, device=device) // width


def bin_thresholds(scores: torch.Tensor, adjusted: torch.Tensor, top_k: int, width: int) -> torch.Tensor:
    """scores, adjusted [n, E] (adjusted = scores - price of the expert's bin; -BIG: not
    allowed) -> tau [n, B, m], m = min(k, width): token i takes >= j experts of bin b iff
    price[b] < tau[i, b, j-1]. +BIG: always taken (too few experts elsewhere); -BIG: never."""
    n, num_experts = scores.shape
    bins = num_experts // width
    m = min(top_k, width)
    depth = min(num_experts, top_k + m)  # the best k outside any bin are among the global top k+m
    values, index = adjusted.topk(depth, dim=1)  # [n, D] descending
    # own[i, b, j]: j-th best score of bin b, without its own price (adjusted + price = scores where allowed)
    own_scores = torch.where(adjusted > -BIG / 2, scores, torch.full_like(scores, -BIG))
    if width == 1:
        # One expert per bin: the k-th best outside expert e is the (k+1)-th overall if e is in
        # the token's top k, else the k-th.
        own = own_scores[:, :, None]  # [n, E, 1]
        kth = values[:, top_k - 1:top_k]  # [n, 1]
        next_ = values[:, top_k:top_k + 1] if depth > top_k else torch.full_like(kth, -BIG)  # [n, 1]
        outside = torch.where(adjusted >= kth, next_, kth)[:, :, None]  # [n, E, 1]
    else:
        own = own_scores.view(n, bins, width).topk(m, dim=2).values  # [n, B, m]
        ranks_needed = torch.arange(top_k, top_k - m, -1, device=scores.device)  # [m]: k, k-1, ..., k-m+1
        # The best adjusted scores outside bin b: the token's list without b's entries, in order.
        entry_bin = index // width  # [n, D]
        in_bin = entry_bin[:, None, :] == torch.arange(bins, device=scores.device)[None, :, None]  # [n, B, D]
        order = torch.argsort(in_bin.to(torch.int8), dim=2, stable=True)  # [n, B, D] entries of other bins first
        others = torch.cat([values[:, None, :].expand(n, bins, depth).gather(2, order),
                            values.new_full((n, bins, 1), -BIG)], dim=2)  # [n, B, D+1]
        count = depth - in_bin.sum(dim=2, keepdim=True)  # [n, B, 1] entries of other bins in the list
        want = (ranks_needed - 1)[None, None, :].expand(n, bins, m)  # [n, B, m]
        at = torch.where(want < count, want, torch.full_like(want, depth))  # [n, B, m]; depth: the -BIG pad
        outside = others.gather(2, at)  # [n, B, m]
    tau = own - outside  # [n, B, m]
    tau = torch.where(own <= -BIG / 2, torch.full_like(tau, -BIG), tau)  # no j-th allowed expert: never
    return tau.clamp(-BIG, BIG)


def price_for_capacity(tau: torch.Tensor, cap: torch.Tensor, max_cap: int) -> torch.Tensor:
    """tau [n, B, m], cap [B] int64 -> [B] the midpoint between the cap-th and (cap+1)-th largest
    tau of each bin (the price at which the bin receives cap pairs, others fixed)."""
    n, bins, m = tau.shape
    flat = tau.permute(1, 0, 2).reshape(bins, n * m)  # [B, n*m]
    depth = min(max_cap + 1, n * m)
    top = flat.topk(depth, dim=1).values  # [B, depth] descending
    top = torch.cat([top[:, :1] + 1.0, top, top.new_full((bins, 1), -BIG)], dim=1)  # [B, depth+2]: 0-th above all
    cap = cap.clamp(max=depth)
    upper = top.gather(1, cap[:, None]).squeeze(1)  # cap-th largest (0-th: above the largest)
    lower = top.gather(1, (cap + 1)[:, None]).squeeze(1)  # (cap+1)-th largest
    return (upper.clamp(-BIG, BIG) + lower.clamp(-BIG, BIG)) / 2


def solve_bin_prices(scores: torch.Tensor, top_k: int, width: int, cap: torch.Tensor, max_cap: int, steps: int,
                     upper_only: bool, allowed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     expert_cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """scores [n, E] float32, cap [B] int64 -> (prices [B] float32 after `steps` damped Jacobi
    steps, expert prices [E] or None, the allowed [n, E] bool mask the prices were settled under,
    or None).

    expert_cap: a ceiling on every expert's pairs besides the bins' capacities. Experts nest in
    bins, so the constraints stay a laminar family (the LP stays integral) and its dual has a
    price per expert as well: a token ranks experts by score - bin price - expert price. Both
    sets move in the same Jacobi step (NESTED_DAMPING), each from thresholds taken net of the
    other's prices; expert prices only ever rise (a ceiling with slack). Without them the
    ceiling was left to the repair rounds alone, which on the tiny eval model gave up 10-37% of
    what balance costs the objective at caps of 2 to 1.25, and 10-140% on random calls
    (tests/routing/test_capacity_optimality.py); with them 0.2-3.8% and 0-7% (docs/EVAL.md).

    upper_only: caps are ceilings with slack (the rank tolerance), so a bin is never paid to take
    more (price >= 0); otherwise caps are exact shares and prices may go negative.
    allowed_fn: adjusted [n, E] -> allowed [n, E] bool (group-limited routing), or None. Its
    response jumps when a token switches groups, which keeps prices from settling; so for
    `steps` steps tokens re-pick their groups under the current prices (smaller steps), then
    the picks are frozen and steps // 2 more steps settle the prices for them. (Half live, half
    frozen at 20 steps left 5 of 16 skewed DeepSeek-V3-shaped calls at EP16/32 where no single
    move could finish the balance; 20 live + 10 frozen left none.)"""
    n, num_experts = scores.shape
    bins = num_experts // width
    bin_of = expert_bins(num_experts, width, scores.device)  # [E]
    price = scores.new_zeros(bins)  # [B]
    # A price beyond the scores' spread already excludes (or forces) a bin; keeping prices there
    # keeps adjusted scores exact in float32 when a bin cannot reach its cap.
    spread = (scores.max() - scores.min()).clamp(max=BIG / 4) + 1.0  # 0-d, on the device
    allowed = None
    expert_price = None if expert_cap is None else scores.new_zeros(num_experts)  # [E]
    expert_caps = None if expert_cap is None else torch.full((num_experts,), expert_cap, dtype=torch.int64,
                                                             device=scores.device)
    total = steps if allowed_fn is None else steps + steps // 2
    for step in range(total):
        net = scores if expert_price is None else scores - expert_price  # [n, E] without the bin prices
        adjusted = net - price[bin_of]  # [n, E]
        live = allowed_fn is not None and step < steps
        if live or (allowed_fn is not None and allowed is None):
            allowed = allowed_fn(adjusted)  # [n, E]: re-picked while live, then frozen
        if allowed is not None:
            adjusted = torch.where(allowed, adjusted, torch.full_like(adjusted, -BIG))
        damping = GROUPED_DAMPING if live else NESTED_DAMPING if expert_price is not None else DAMPING
        tau = bin_thresholds(net, adjusted, top_k, width)  # [n, B, m]
        target = price_for_capacity(tau, cap, max_cap)  # [B]
        target = torch.maximum(torch.minimum(target, spread), -spread)
        if upper_only:
            target = target.clamp(min=0.0)
        if expert_price is not None:
            tau_e = bin_thresholds(scores - price[bin_of], adjusted, top_k, 1)  # [n, E, 1]
            target_e = price_for_capacity(tau_e, expert_caps, expert_cap).clamp(min=0.0)  # [E]
            expert_price = expert_price + damping * (torch.minimum(target_e, spread) - expert_price)
        price = price + damping * (target - price)
    if allowed_fn is not None and allowed is None:  # no steps: the group rule on the raw scores
        allowed = allowed_fn(scores)
    return price, expert_price, allowed
