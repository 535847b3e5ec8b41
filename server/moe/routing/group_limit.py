"""Group-limited routing (DeepSeek-V3's n_group / topk_group) for policies that re-assign experts.

DeepSeek-V3 splits the E experts into n_group equal groups and lets each token use experts of at
most topk_group of them: groups sit on nodes, so the limit caps how many nodes a token's
all-to-all reaches. A policy that moves tokens between experts must keep that promise, or the
communication the model was built around grows. Two pieces:

* `allowed_by_group_rule`: the router's own rule on price-adjusted scores (rank groups by the
  sum of their two best scores, keep the best topk_group, mask the rest). Prices steer whole
  groups: a token leaves an expensive group for a cheaper one instead of scattering.
* `group_keeping_takes`: which experts a token may take in a repair move that gives up expert o
  without exceeding the limit: one in a group it already uses, any while it uses fewer than
  topk_group groups, or any when o is its only expert in o's group (o's group is freed).
"""
from __future__ import annotations

import torch


def allowed_by_group_rule(adjusted: torch.Tensor, groups: int, topk_groups: int) -> torch.Tensor:
    """adjusted [n, E] -> [n, E] bool: experts of each token's topk_groups best groups."""
    n, num_experts = adjusted.shape
    per_group = num_experts // groups
    grouped = adjusted.view(n, groups, per_group)  # [n, G, E/G]
    group_score = grouped.topk(min(2, per_group), dim=2).values.sum(dim=2)  # [n, G]
    best = group_score.topk(topk_groups, dim=1).indices  # [n, G']
    keep = torch.zeros(n, groups, dtype=torch.bool, device=adjusted.device).scatter(1, best, True)  # [n, G]
    return keep[:, :, None].expand(n, groups, per_group).reshape(n, num_experts)


def groups_used(ids: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """ids [n, k] -> [n, G] int64 experts the token holds in each group."""
    group_of = (ids // per_group).long()  # [n, k]
    return torch.zeros(ids.shape[0], groups, dtype=torch.int64, device=ids.device).scatter_add(
        1, group_of, torch.ones_like(group_of))


def group_keeping_takes(ids: torch.Tensor, giving: torch.Tensor, num_experts: int, groups: int,
                        topk_groups: int) -> torch.Tensor:
    """ids [n, k], giving [n] (the expert each token would give up) -> [n, E] bool."""
    per_group = num_experts // groups
    count = groups_used(ids, groups, per_group)  # [n, G]
    used = count > 0  # [n, G]
    has_room = used.sum(dim=1, keepdim=True) < topk_groups  # [n, 1]
    frees_group = count.gather(1, (giving // per_group).long()[:, None]) == 1  # [n, 1]
    ok_group = used | has_room | frees_group  # [n, G]
    return ok_group[:, :, None].expand(-1, groups, per_group).reshape(ids.shape[0], num_experts)


def within_group_limit(ids: torch.Tensor, num_experts: int, groups: int, topk_groups: int) -> torch.Tensor:
    """ids [n, k] -> [n] bool: the token's experts span at most topk_groups groups."""
    per_group = num_experts // groups
    return (groups_used(ids, groups, per_group) > 0).sum(dim=1) <= topk_groups
