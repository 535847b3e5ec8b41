"""Balanced policies after DeepSeek-V3's group-limited router still balance EP ranks when the
expert groups do not line up with the ranks (a group straddling two ranks, several groups per
rank, more ranks than groups). The router is skewed so that natural routing piles onto one
group; the policies hook in after the group-limited top-k (as the MoE layer calls them)."""
from __future__ import annotations

import pytest
import torch

from server.moe.router import sigmoid_group_topk
from server.moe.routing import RoutingContext, build_policy

TOKENS = 96  # per rank


def _route(policy_name: str, num_experts: int, groups: int, top_k: int, ep: int, seed: int = 0):
    """-> (expert loads [E] summed over source ranks, per-source-rank expert loads [ep, E])."""
    policy = build_policy(policy_name)
    gen = torch.Generator().manual_seed(seed)
    per_group = num_experts // groups
    top_groups = -(-top_k // per_group)  # the fewest groups that hold k experts
    skew = torch.zeros(num_experts)
    skew[:top_groups * per_group] = 3.0  # the first groups win almost every token under natural routing
    per_source = torch.zeros(ep, num_experts, dtype=torch.int64)
    for rank in range(ep):
        logits = torch.randn(TOKENS, num_experts, generator=gen) + skew  # [N, E]
        weights, ids = sigmoid_group_topk(logits, top_k, correction_bias=torch.zeros(num_experts), num_groups=groups,
                                          topk_groups=top_groups, renormalize=True, scaling_factor=2.5)
        ctx = RoutingContext(layer=0, num_experts=num_experts, top_k=top_k, ep_rank=rank, ep_size=ep,
                             token_offset=rank * TOKENS)
        new_ids, new_weights = policy(ids.to(torch.int32), weights, logits, ctx)
        assert new_ids.shape == (TOKENS, top_k) and new_ids.dtype == torch.int32
        assert all(len(set(row)) == top_k for row in new_ids.tolist())  # k distinct experts per token
        assert int(new_ids.min()) >= 0 and int(new_ids.max()) < num_experts
        per_source[rank] = torch.bincount(new_ids.reshape(-1).long(), minlength=num_experts)
    return per_source.sum(0), per_source


def _rank_max_over_mean(expert_loads: torch.Tensor, ep: int) -> float:
    ranks = expert_loads.view(ep, -1).sum(1).float()  # [ep] tokens each rank's experts receive
    return float(ranks.max() / ranks.mean())


# (experts, groups, top-k, ep): a group straddles ranks (12/3 at ep 4 and 2), several groups per
# rank (16/8 at ep 2), more ranks than groups (16/2 at ep 8), one group per rank (16/4 at ep 4)
LAYOUTS = [(12, 3, 3, 4), (12, 3, 3, 2), (16, 8, 4, 2), (16, 2, 4, 8), (16, 4, 4, 4)]
IDS = [f"E{e}-G{g}-k{k}-ep{ep}" for e, g, k, ep in LAYOUTS]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_natural_grouped_routing_is_skewed_across_ranks(layout):
    num_experts, groups, top_k, ep = layout
    loads, _ = _route("natural", num_experts, groups, top_k, ep)
    assert _rank_max_over_mean(loads, ep) > 1.5  # the skew the policies must undo


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_round_robin_balances_experts_and_ranks(layout):
    num_experts, groups, top_k, ep = layout
    loads, _ = _route("round_robin_balanced", num_experts, groups, top_k, ep)
    assert int(loads.max() - loads.min()) <= 1  # per expert, summed over source ranks
    assert _rank_max_over_mean(loads, ep) <= 1 + num_experts / loads.sum().item()  # follows from ±1 per expert


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_greedy_balances_experts_on_each_rank_and_ranks(layout):
    num_experts, groups, top_k, ep = layout
    loads, per_source = _route("greedy_balanced", num_experts, groups, top_k, ep)
    assert int((per_source.max(1).values - per_source.min(1).values).max()) <= 1  # each source rank: within ±1
    assert _rank_max_over_mean(loads, ep) <= 1.05
