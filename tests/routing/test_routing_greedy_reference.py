"""greedy_balanced against LightLLM's fake-balance rule (plain loop in server/moe/routing/lightllm_rule.py)."""
from __future__ import annotations

import pytest
import torch

from server.moe.routing import RoutingContext, build_policy
from server.moe.routing.greedy import greedy_balanced_torch
from server.moe.routing.lightllm_rule import lightllm_generator_torch, lightllm_rule_reference


@pytest.mark.parametrize(
    "n,num_experts,top_k",
    [(0, 8, 2), (1, 8, 2), (3, 8, 8), (37, 8, 2), (64, 16, 4), (50, 60, 8), (41, 64, 6), (70, 12, 5), (33, 7, 3), (20, 256, 8), (130, 16, 1)],
)
def test_same_ids_as_lightllm_rule(n: int, num_experts: int, top_k: int) -> None:
    """Exactly LightLLM's walk, slot by slot, with router-score tie-breaks (E % k == 0 or not)."""
    scores = torch.randn(n, num_experts, generator=torch.Generator().manual_seed(n + num_experts))
    ours = greedy_balanced_torch(scores, top_k)
    assert torch.equal(ours, lightllm_rule_reference(scores, top_k))


def test_ties_in_load_go_to_highest_score() -> None:
    """First token of a round: all loads equal, so it gets exactly its router top-k, in score order."""
    scores = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    ids = greedy_balanced_torch(scores, 4)
    assert torch.equal(ids[0].long(), scores[0].topk(4).indices)


def test_equal_scores_break_to_lower_expert_id() -> None:
    scores = torch.zeros(4, 8)
    ids = greedy_balanced_torch(scores, 2)
    assert ids.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_same_load_profile_as_lightllm_generator() -> None:
    """LightLLM's own generator (random ties) lands on the same per-expert loads."""
    for n, num_experts, top_k in [(37, 8, 3), (100, 16, 4), (25, 12, 5)]:
        lightllm_ids = lightllm_generator_torch(n, num_experts, top_k)
        scores = torch.randn(n, num_experts)
        ours = build_policy("fake_balance")(lightllm_ids, torch.ones(n, top_k), scores, RoutingContext(layer=0, num_experts=num_experts, top_k=top_k))[0]
        lightllm_load = torch.bincount(lightllm_ids.reshape(-1).long(), minlength=num_experts).sort().values
        our_load = torch.bincount(ours.reshape(-1).long(), minlength=num_experts).sort().values
        assert torch.equal(lightllm_load, our_load)


def test_accepts_bfloat16_and_negative_scores() -> None:
    scores = (torch.randn(40, 16) * 5 - 3).to(torch.bfloat16)
    assert torch.equal(greedy_balanced_torch(scores, 4), lightllm_rule_reference(scores.float(), 4))
