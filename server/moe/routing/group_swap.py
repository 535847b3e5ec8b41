"""Whole-group moves for rank_balanced under a group limit whose groups sit inside ranks.

When each group lies inside one rank (DeepSeek-V2 at EP8: 8 groups of 20 experts, one per
rank) and a token already uses its topk_group groups, no single-pair move can bring it to a
new rank: taking an expert there would open a group past the limit. The move that can: give up
all c experts the token holds in one group of an over-capacity rank and take the c best experts
of a group it does not use, in an under-capacity rank. The token's group count stays the same.

Per round, in parallel: every token names the group it would give up (in an over-capacity
rank, lowest summed score); every under-capacity rank offers its room, counted in pairs, to the
tokens that lose least by moving a group into it; every token takes its best offer; every
over-capacity rank releases at most its excess in pairs. No host sync, fixed shapes.
"""
from __future__ import annotations

import torch

from .capacity_repair import accepted_within_quota, bin_loads
from .group_limit import groups_used


def groups_nest_in_bins(num_experts: int, groups: int, width: int) -> bool:
    """Whether every group lies inside one bin (the case whole-group moves serve)."""
    per_group = num_experts // groups
    return width % per_group == 0


def group_swap_round(scores: torch.Tensor, ids: torch.Tensor, width: int, cap: torch.Tensor, groups: int) -> torch.Tensor:
    """scores [n, E] float32, ids [n, k] int64, cap [B] -> ids [n, k] after one round of whole-group moves."""
    n, num_experts = scores.shape
    bins = cap.shape[0]
    per_group = num_experts // groups
    per_bin = groups // bins  # groups in each bin
    load = bin_loads(ids, width, bins)  # [B]
    group_bin = torch.arange(groups, device=scores.device) // per_bin  # [G]
    count = groups_used(ids, groups, per_group)  # [n, G] experts held per group
    held_sum = torch.zeros(n, groups, dtype=scores.dtype, device=scores.device).scatter_add(
        1, (ids // per_group).long(), scores.gather(1, ids.long()))  # [n, G] summed score held per group
    inf = torch.full_like(held_sum, float("inf"))
    giving = (count > 0) & (load > cap)[group_bin][None, :]  # [n, G]
    give_sum, give = torch.where(giving, held_sum, inf).min(dim=1)  # [n]
    c = count.gather(1, give[:, None]).squeeze(1).clamp(min=1)  # [n] experts moved
    best, best_local = scores.view(n, groups, per_group).sort(dim=2, descending=True)  # [n, G, E/G] each
    take_value = best.cumsum(dim=2).gather(2, (c - 1).clamp(max=per_group - 1)[:, None, None].expand(n, groups, 1))
    takeable = (count == 0) & (load < cap)[group_bin][None, :] & (c[:, None] <= per_group)  # [n, G]
    gain = torch.where(takeable, take_value.squeeze(2) - give_sum[:, None], -inf)  # [n, G]
    bin_gain, in_bin = gain.view(n, bins, per_bin).max(dim=2)  # [n, B] best group of each bin
    possible = torch.isfinite(bin_gain)
    bin_gain = torch.where(possible, bin_gain, torch.full_like(bin_gain, -float("inf")))
    room = (cap - load).clamp(min=0)  # [B]
    order = torch.argsort(bin_gain, dim=0, descending=True, stable=True)  # [n, B]
    moved = c[order].cumsum(dim=0)  # [n, B] pairs offered so far, per bin, in gain order
    offered = torch.empty_like(possible).scatter(0, order, moved <= room[None, :]) & possible  # [n, B]
    gain_taken, take_bin = torch.where(offered, bin_gain, torch.full_like(bin_gain, -float("inf"))).max(dim=1)  # [n]
    valid = offered.any(dim=1) & torch.isfinite(give_sum)
    accept = accepted_within_quota(group_bin[give], (load - cap).clamp(min=0), gain_taken, valid, amount=c)
    take_group = take_bin * per_bin + in_bin.gather(1, take_bin[:, None]).squeeze(1)  # [n]
    leaving = accept[:, None] & ((ids // per_group) == give[:, None])  # [n, k] slots that move
    slot = (leaving.long().cumsum(dim=1) - 1).clamp(min=0)  # [n, k] which of the c new experts each takes
    new_local = best_local[torch.arange(n, device=ids.device), take_group].gather(1, slot.clamp(max=per_group - 1))  # [n, k]
    return torch.where(leaving, (take_group[:, None] * per_group + new_local).to(ids.dtype), ids)
