"""Moving the last pairs: after priced top-k (capacity_prices.py) a few bins sit above their
capacity; rounds of single-pair moves bring every bin within it, losing as little score as they can.

A move takes one expert o from a token and gives it an expert u it lacks: o's bin is over
capacity, u's bin under it. Without a group limit or expert cap, one always exists while some
bin is over: if every token holding an expert of an over-capacity bin X also held every expert
of an under-capacity bin Y, Y would receive at least as many pairs as X, which it does not. Each
round, in parallel, every token
names the o it scores lowest among over-capacity bins, under-capacity bins offer their room to
the tokens that lose least by moving in, and over-capacity bins release at most their excess.
The single cheapest move is always made, so every round makes progress; in practice a few
rounds clear what 20 price steps leave (at most 5 at n=8192, E=256, k=8 in our measurements).
The number of rounds is fixed (no host sync, the same work in every call); the policy checks
the result on the device and falls back to a closed-form balanced assignment in the rare call
where the rounds did not finish (capacity_policy.py).
"""
from __future__ import annotations

from typing import Callable

import torch

#: take_filter(held [n, E] bool, ids [n, k], giving [n] expert) -> [n, E] bool: experts the token may take
TakeFilter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def bin_loads(ids: torch.Tensor, width: int, bins: int) -> torch.Tensor:
    """ids [n, k] -> [bins] int64 pairs per bin (scatter_add: no host sync, unlike bincount)."""
    flat = (ids.reshape(-1) // width).long()  # [n*k]
    return torch.zeros(bins, dtype=torch.int64, device=ids.device).scatter_add(0, flat, torch.ones_like(flat))


def held_mask(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [n, k] -> [n, E] bool."""
    return torch.zeros(ids.shape[0], num_experts, dtype=torch.bool, device=ids.device).scatter(1, ids.long(), True)


def accepted_within_quota(group: torch.Tensor, quota: torch.Tensor, gain: torch.Tensor, valid: torch.Tensor,
                          amount: torch.Tensor | None = None) -> torch.Tensor:
    """group [n] long, quota [G], gain [n], valid [n] bool -> [n] bool: in each group g, valid
    proposals in order of gain (ties: lower token index) while their summed `amount` [n] (1 each
    by default) stays within quota[g]."""
    n, groups = group.shape[0], quota.shape[0]
    g = torch.where(valid, group, torch.full_like(group, groups))  # invalid proposals: a spare group
    by_gain = torch.argsort(gain, descending=True, stable=True)  # [n]
    order = by_gain[torch.argsort(g[by_gain], stable=True)]  # [n] sorted by (group, -gain)
    sorted_group = g[order]
    first = torch.searchsorted(sorted_group, sorted_group)  # [n] start of each token's group
    size = torch.ones_like(order) if amount is None else amount[order].long()  # [n]
    total = size.cumsum(0)
    used = torch.empty_like(order).scatter(0, order, total - (total - size)[first])  # [n] amount up to and including this proposal, in its group
    room = torch.cat([quota, quota.new_zeros(1)])  # [G+1]
    return valid & (used <= room[g])


def repair_round(scores: torch.Tensor, ids: torch.Tensor, width: int, cap: torch.Tensor,
                 take_filter: TakeFilter | None = None, expert_room: torch.Tensor | None = None) -> torch.Tensor:
    """One round of moves. scores [n, E] float32, ids [n, k] int64, cap [B] -> new ids [n, k].

    Every token picks the expert it would give up (its lowest-scored one in an over-capacity
    bin); every under-capacity bin offers its room to the tokens that lose least by taking
    their best expert in it; every token takes its best offer; every over-capacity bin lets go
    of at most its excess, least loss first. Offers come from the bins' side so that bins
    wanted by the same tokens do not all wait for one token per round.
    expert_room [E] int64 or None: how many more pairs each expert may take (a per-expert cap
    inside the bins), enforced as one more acceptance quota."""
    n, num_experts = scores.shape
    bins = cap.shape[0]
    load = bin_loads(ids, width, bins)  # [B]
    bin_of = torch.arange(num_experts, device=scores.device) // width  # [E]
    over, under = (load > cap)[bin_of], (load < cap)[bin_of]  # [E] each
    held = held_mask(ids, num_experts)  # [n, E]
    inf = torch.full_like(scores, float("inf"))
    give_score, give = torch.where(held & over, scores, inf).min(dim=1)  # [n]: cheapest expert to give up
    takeable = ~held & under
    if expert_room is not None:
        takeable = takeable & (expert_room > 0)
    if take_filter is not None:
        takeable = takeable & take_filter(held, ids, give)
    best_in_bin, local = torch.where(takeable, scores, -inf).view(n, bins, width).max(dim=2)  # [n, B] each
    bin_gain = best_in_bin - give_score[:, None]  # [n, B]; -inf / nan where no move exists
    possible = torch.isfinite(bin_gain)
    bin_gain = torch.where(possible, bin_gain, torch.full_like(bin_gain, -float("inf")))
    order = torch.argsort(bin_gain, dim=0, descending=True, stable=True)  # [n, B] tokens by loss, per bin
    place = torch.empty_like(order).scatter(0, order, torch.arange(n, device=scores.device)[:, None].expand(n, bins))
    offered = possible & (place < (cap - load).clamp(min=0)[None, :])  # [n, B]
    gain, take_bin = torch.where(offered, bin_gain, torch.full_like(bin_gain, -float("inf"))).max(dim=1)  # [n]
    take = take_bin * width + local.gather(1, take_bin[:, None]).squeeze(1)  # [n] expert taken
    valid = offered.any(dim=1)  # [n]
    accept = accepted_within_quota(bin_of[give], (load - cap).clamp(min=0), gain, valid)
    if expert_room is not None:
        accept = accept & accepted_within_quota(take, expert_room.clamp(min=0), gain, valid)
    swap = accept[:, None] & (ids == give[:, None])  # [n, k]
    return torch.where(swap, take[:, None].to(ids.dtype), ids)


def same_bin_takes(width: int, num_experts: int, base: TakeFilter | None) -> TakeFilter:
    """A filter keeping takes in the giving expert's own bin (and passing `base`, if any)."""

    def take_filter(held: torch.Tensor, ids: torch.Tensor, giving: torch.Tensor) -> torch.Tensor:
        bin_of = torch.arange(num_experts, device=ids.device) // width  # [E]
        same = bin_of[None, :] == (giving // width)[:, None]  # [n, E]
        return same if base is None else same & base(held, ids, giving)

    return take_filter


def repair(scores: torch.Tensor, ids: torch.Tensor, width: int, cap: torch.Tensor, rounds: int,
           take_filter: TakeFilter | None = None, expert_cap: torch.Tensor | None = None,
           swap_groups: int | None = None) -> torch.Tensor:
    """`rounds` rounds of moves (a round with nothing over capacity changes nothing).

    With `expert_cap` [E], each round first moves pairs off experts above their ceiling to
    experts of the same bin (bin loads unchanged), then balances the bins without pushing any
    expert past its ceiling. With `swap_groups` (the router's group count, groups inside bins),
    each round ends with whole-group moves (group_swap.py) for tokens whose group limit leaves
    no single pair free to move."""
    from .group_swap import group_swap_round  # group_swap builds on this module: import at call time

    num_experts = scores.shape[1]
    inside_bin = same_bin_takes(width, num_experts, take_filter) if expert_cap is not None else None
    for _ in range(rounds):
        room = None
        if expert_cap is not None:
            ids = repair_round(scores, ids, 1, expert_cap, inside_bin)
            room = expert_cap - bin_loads(ids, 1, num_experts)  # [E]
        ids = repair_round(scores, ids, width, cap, take_filter, room)
        if swap_groups is not None:
            ids = group_swap_round(scores, ids, width, cap, swap_groups)
    return ids
