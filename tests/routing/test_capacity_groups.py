"""rank_balanced after DeepSeek-V3's group-limited router: exact rank balance while every token
keeps its experts within topk_group groups, whether groups line up with ranks or not; and the
MoE layer hands capacity policies the router's selection scores."""
from __future__ import annotations

import pytest
import torch

from server.moe.router import SELECTION_SCORES, sigmoid_group_topk
from server.moe.routing import RoutingContext, build_policy
from server.moe.routing.group_limit import within_group_limit

TOKENS = 96

# (experts, groups, topk_groups, top-k, ep). Roomy: single-pair moves can change a token's
# groups (it has a group with one expert, or a group spans ranks), or its groups lie inside ranks
# and whole-group moves do it: DeepSeek-V3 (256/8/4/8) at EP8-32, DeepSeek-V2's 160/8/3/6 at EP8
# (one group per rank), groups of 2 inside ranks of 8.
ROOMY = [(12, 3, 2, 3, 4), (64, 8, 4, 8, 8), (256, 8, 4, 8, 8), (256, 8, 4, 8, 16), (256, 8, 4, 8, 32), (32, 8, 4, 8, 4),
         (48, 6, 3, 6, 4), (160, 8, 3, 6, 8), (16, 8, 3, 4, 2)]
# Tight: a token must move whole groups, and either its groups span ranks (topk_group 1, a group
# over two ranks) or the last excess is smaller than any token's group; such calls fall back
# (rank balance exact, group limit not kept), counted.
TIGHT = [(16, 4, 2, 4, 4), (16, 2, 1, 4, 8)]


def grouped_router(num_experts: int, groups: int, topk_groups: int, top_k: int, seed: int):
    """Router outputs skewed onto the first groups, as the rule itself computes them."""
    gen = torch.Generator().manual_seed(seed)
    skew = torch.zeros(num_experts)
    skew[: num_experts // groups * topk_groups] = 2.0
    logits = torch.randn(TOKENS, num_experts, generator=gen) + skew  # [N, E]
    bias = 0.1 * torch.randn(num_experts, generator=gen)  # [E] correction bias
    weights, ids = sigmoid_group_topk(logits, top_k, correction_bias=bias, num_groups=groups, topk_groups=topk_groups,
                                      renormalize=True, scaling_factor=2.5)
    scores = SELECTION_SCORES["sigmoid_group_topk"](logits, correction_bias=bias)  # [N, E]
    return ids.to(torch.int32), weights, scores


def route_every_rank(layout, tolerance: float):
    """-> per call (rank load [ep], group limit kept, fell back) over every source rank."""
    num_experts, groups, topk_groups, top_k, ep = layout
    policy = build_policy("rank_balanced", tolerance=tolerance)
    out = []
    for rank in range(ep):
        ids_in, w_in, scores = grouped_router(num_experts, groups, topk_groups, top_k, seed=rank)
        assert within_group_limit(ids_in, num_experts, groups, topk_groups).all()  # the router's own promise
        ctx = RoutingContext(layer=0, num_experts=num_experts, top_k=top_k, ep_rank=rank, ep_size=ep,
                             token_offset=rank * TOKENS, router_groups=groups, router_topk_groups=topk_groups)
        before = policy.fallback_calls()
        ids, _ = policy(ids_in, w_in, scores, ctx)
        assert (ids.sort(dim=1).values.diff(dim=1) != 0).all()
        loads = torch.zeros(num_experts, dtype=torch.int64).scatter_add_(0, ids.reshape(-1).long(),
                                                                         torch.ones(ids.numel(), dtype=torch.int64))
        pairs = TOKENS * top_k
        rank_load = loads.view(ep, -1).sum(1)
        if tolerance == 0:
            assert int(rank_load.min()) >= pairs // ep and int(rank_load.max()) <= -(-pairs // ep), rank_load
        else:
            assert int(rank_load.max()) <= policy.capacities(TOKENS, ctx).ceiling, rank_load
        out.append((bool(within_group_limit(ids, num_experts, groups, topk_groups).all()),
                    policy.fallback_calls() > before))
    return out


@pytest.mark.parametrize("layout", ROOMY, ids=[f"E{e}-G{g}-top{tg}-k{k}-ep{ep}" for e, g, tg, k, ep in ROOMY])
@pytest.mark.parametrize("tolerance", [0.0, 0.1])
def test_rank_balance_within_the_group_limit(layout, tolerance: float) -> None:
    calls = route_every_rank(layout, tolerance)
    assert all(kept and not fell_back for kept, fell_back in calls), calls


@pytest.mark.parametrize("layout", TIGHT, ids=[f"E{e}-G{g}-top{tg}-k{k}-ep{ep}" for e, g, tg, k, ep in TIGHT])
def test_tight_group_limits_keep_rank_balance(layout) -> None:
    """Rank balance holds in every call; the group limit holds in every call that did not fall back."""
    calls = route_every_rank(layout, 0.0)
    assert all(kept for kept, fell_back in calls if not fell_back), calls


def test_group_limit_ignored_without_groups_in_context() -> None:
    """Without the router's group limit in the context the policy is free to spread a token."""
    num_experts, groups, topk_groups, top_k, ep = 16, 2, 1, 4, 8
    ids_in, w_in, scores = grouped_router(num_experts, groups, topk_groups, top_k, seed=0)
    ids, _ = build_policy("rank_balanced")(ids_in, w_in, scores,
                                           RoutingContext(layer=0, num_experts=num_experts, top_k=top_k, ep_size=ep))
    assert not within_group_limit(ids, num_experts, groups, topk_groups).all()


def test_moe_layer_hands_selection_scores_to_capacity_policies() -> None:
    """A policy that asks for selection scores gets sigmoid + correction bias from a DeepSeek
    gate; every other policy keeps getting the raw gate logits."""
    from server.moe.layer import MoELayer

    seen = {}

    class Spy:
        def __init__(self, wants: bool) -> None:
            self.wants_selection_scores = wants

        def __call__(self, ids, weights, scores, ctx):
            seen[self.wants_selection_scores] = scores
            return ids, weights

    from server.moe.runtime import MoERuntime

    class Counters:
        def record(self, *args, **kwargs):
            pass

    def dispatcher(x, ids, weights, experts, valid=None, rows=None):
        return torch.zeros_like(x)

    runtime = MoERuntime(policy=Spy(True), counters=Counters(), dispatcher=dispatcher, num_layers=1, num_experts=8, top_k=2)
    layer = MoELayer(moe_index=0, hidden=16, num_experts=8, top_k=2, intermediate=8, act="silu", runtime=runtime,
                     renormalize=True, router_rule="sigmoid_group_topk",
                     router_options={"num_groups": 2, "topk_groups": 1, "scaling_factor": 1.0})
    torch.nn.init.normal_(layer.gate.weight)
    layer.gate.e_score_correction_bias.data = torch.linspace(-1, 1, 8)
    x = torch.randn(5, 16)
    logits = layer.gate(x)
    for wants in (True, False):
        runtime.policy = Spy(wants)
        layer(x, runtime.step())
    assert torch.allclose(seen[True], logits.sigmoid() + torch.linspace(-1, 1, 8))
    assert torch.equal(seen[False], logits)
