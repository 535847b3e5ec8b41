"""`call_ranks`: every EP rank's policy call at once (what the EP what-if does) returns exactly
what the one-call path returns, for the capacity solvers' batched solve and for the default
loop; the fallback count agrees too. Mixed token counts, empty calls and the router's group
limit included, with TIGHT layouts where some calls fall back."""
from __future__ import annotations

import pytest
import torch

from server.moe.routing import RoutingContext, build_policy

from .test_capacity_groups import TIGHT, grouped_router

CASES = [
    ("optimal_balanced", {}),
    ("optimal_balanced", {"keep_bonus": 1.0}),
    ("rank_balanced", {}),
    ("rank_balanced", {"tolerance": 0.1}),
    ("rank_balanced", {"expert_cap": 1.5}),
    ("greedy_balanced", {}),
    ("round_robin_balanced", {"weights": "uniform"}),
]


def softmax_calls(num_experts: int, top_k: int, ep: int, tokens: list[int], seed: int):
    """One call per rank: skewed softmax-router outputs of tokens[r] rows, contexts as a real
    EP step gives them (rank r's token offset = the rows of ranks before it)."""
    gen = torch.Generator().manual_seed(seed)
    calls, offset = [], 0
    for rank, n in enumerate(tokens):
        logits = torch.randn(n, num_experts, generator=gen) + torch.linspace(2.0, 0.0, num_experts)  # [n, E]
        weights, ids = logits.softmax(-1).topk(top_k, dim=-1)  # [n, k] each
        ctx = RoutingContext(layer=3, num_experts=num_experts, top_k=top_k, ep_rank=rank, ep_size=ep,
                             token_offset=offset, seed=seed)
        calls.append((ids.to(torch.int32), weights, logits, ctx))
        offset += n
    return calls


def assert_same_as_one_by_one(name: str, params: dict, calls) -> None:
    one, batched = build_policy(name, **params), build_policy(name, **params)
    expected = [one(*call) for call in calls]
    got = batched.call_ranks(calls)
    assert len(got) == len(calls)
    for (ids, weights), (want_ids, want_weights) in zip(got, expected):
        assert ids.dtype == torch.int32 and torch.equal(ids, want_ids)
        assert torch.equal(weights, want_weights)
    if hasattr(one, "fallback_calls"):
        assert batched.fallback_calls() == one.fallback_calls()


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{'-'.join(map(str, p.values())) or 'default'}" for n, p in CASES])
def test_every_rank_at_once_equals_one_call_at_a_time(name: str, params: dict) -> None:
    # ranks 0-2 and 4 share a shape (batched), rank 3 has its own, rank 5 is empty
    calls = softmax_calls(num_experts=32, top_k=4, ep=8, tokens=[24, 24, 24, 40, 24, 0, 24, 24], seed=7)
    assert_same_as_one_by_one(name, params, calls)


def test_group_limited_router_at_once_equals_one_at_a_time() -> None:
    """DeepSeek-V3's layout (256 experts, 8 groups, top-4 groups, top-8) at EP16, and a tight
    layout where some calls take the closed-form fallback."""
    for num_experts, groups, topk_groups, top_k, ep in [(256, 8, 4, 8, 16), *TIGHT]:
        calls = []
        for rank in range(min(ep, 6)):
            ids, weights, scores = grouped_router(num_experts, groups, topk_groups, top_k, seed=rank)
            ctx = RoutingContext(layer=0, num_experts=num_experts, top_k=top_k, ep_rank=rank, ep_size=ep,
                                 token_offset=rank * ids.shape[0], router_groups=groups, router_topk_groups=topk_groups)
            calls.append((ids, weights, scores, ctx))
        assert_same_as_one_by_one("rank_balanced", {}, calls)


def test_tight_layout_falls_back_in_the_batch_too() -> None:
    """The fallback count is kept per call inside a batch (a layout known to need it)."""
    num_experts, groups, topk_groups, top_k, ep = TIGHT[1]
    calls = []
    for rank in range(ep):
        ids, weights, scores = grouped_router(num_experts, groups, topk_groups, top_k, seed=rank)
        calls.append((ids, weights, scores, RoutingContext(layer=0, num_experts=num_experts, top_k=top_k, ep_rank=rank,
                                                           ep_size=ep, router_groups=groups,
                                                           router_topk_groups=topk_groups)))
    policy = build_policy("rank_balanced")
    policy.call_ranks(calls)
    one = build_policy("rank_balanced")
    for call in calls:
        one(*call)
    assert policy.fallback_calls() == one.fallback_calls() > 0
