"""optimal_balanced and rank_balanced: the policy contract and their balance guarantees over
random shapes (E, k, n, ep_size, rank, token offset), the fallback, parameters and scores."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.moe.routing import PolicyConfigError, RoutingContext, available_policies, build_policy

VARIANTS = {
    "optimal": ("optimal_balanced", {}),
    "optimal+bonus": ("optimal_balanced", {"keep_bonus": 1.0}),
    "rank": ("rank_balanced", {}),
    "rank t=0.25": ("rank_balanced", {"tolerance": 0.25}),
    "rank cap 1.25": ("rank_balanced", {"expert_cap": 1.25}),
    "rank t=0.1 cap 1.5": ("rank_balanced", {"tolerance": 0.1, "expert_cap": 1.5}),
}


@st.composite
def calls(draw):
    """A routing call: E = ep_size x experts per rank, k <= E, n tokens, this rank, its offset."""
    ep = draw(st.sampled_from([1, 2, 4, 8]))
    num_experts = ep * draw(st.integers(1, 8))
    top_k = draw(st.integers(1, min(num_experts, 8)))
    n = draw(st.integers(0, 48))
    rank = draw(st.integers(0, ep - 1))
    offset = draw(st.integers(0, 10_000))
    skew = draw(st.sampled_from([0.0, 1.0, 4.0]))  # how strongly the router prefers a few experts
    seed = draw(st.integers(0, 2**31 - 1))
    return ep, num_experts, top_k, n, rank, offset, skew, seed


def router_outputs(n: int, num_experts: int, top_k: int, skew: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_experts, generator=g) + skew * torch.linspace(1, 0, num_experts)  # [N, E]
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)  # [N, k]
    return ids.to(torch.int32), weights, logits


def expert_loads(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(num_experts, dtype=torch.int64).scatter_add_(0, ids.reshape(-1).long(),
                                                                    torch.ones(ids.numel(), dtype=torch.int64))


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls())
def test_contract_and_balance(variant: str, call) -> None:
    ep, num_experts, top_k, n, rank, offset, skew, seed = call
    name, params = VARIANTS[variant]
    policy = build_policy(name, **params)
    ctx = RoutingContext(layer=1, num_experts=num_experts, top_k=top_k, ep_rank=rank, ep_size=ep, token_offset=offset)
    ids_in, w_in, logits = router_outputs(n, num_experts, top_k, skew, seed)
    ids, weights = policy(ids_in, w_in, logits, ctx)
    assert ids.shape == (n, top_k) and ids.dtype == torch.int32 and weights.shape == (n, top_k)
    again, _ = policy(ids_in, w_in, logits, ctx)
    assert torch.equal(ids, again), "not deterministic"
    if n == 0:
        return
    assert int(ids.min()) >= 0 and int(ids.max()) < num_experts
    assert (ids.sort(dim=1).values.diff(dim=1) != 0).all(), "a token got the same expert twice"
    pairs = n * top_k
    load = expert_loads(ids, num_experts)  # [E]
    rank_load = load.view(ep, -1).sum(1)  # [ep]
    if name == "optimal_balanced":
        assert int(load.min()) >= pairs // num_experts and int(load.max()) <= -(-pairs // num_experts), load
        return
    tolerance = params.get("tolerance", 0.0)
    if tolerance == 0:
        assert int(rank_load.min()) >= pairs // ep and int(rank_load.max()) <= -(-pairs // ep), rank_load
    else:
        ceiling = max(-(-pairs // ep), math.floor((1 + tolerance) * pairs / ep + 1e-9))
        assert int(rank_load.max()) <= ceiling, (rank_load, ceiling)
    if "expert_cap" in params:
        assert int(load.max()) <= math.ceil(params["expert_cap"] * pairs / num_experts - 1e-9), load


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_fallback_on_router_like_inputs(variant: str) -> None:
    """The repair finishes by itself on router-like inputs, skewed or not: the closed-form
    fallback (exactly balanced, router-blind) is a safety net, not the normal path."""
    name, params = VARIANTS[variant]
    policy = build_policy(name, **params)
    for num_experts, top_k, ep, n, skew in [(16, 2, 4, 1024, 1.0), (64, 8, 8, 512, 4.0), (60, 6, 4, 333, 0.0),
                                            (128, 8, 16, 256, 2.0), (8, 8, 2, 50, 1.0)]:
        ids_in, w_in, logits = router_outputs(n, num_experts, top_k, skew, seed=num_experts + n)
        policy(ids_in, w_in, logits, RoutingContext(layer=0, num_experts=num_experts, top_k=top_k, ep_size=ep))
    assert policy.fallback_calls() == 0


@pytest.mark.parametrize("name", ["optimal_balanced", "rank_balanced"])
def test_fallback_keeps_balance_and_is_counted(name: str) -> None:
    """With no price steps and no repair rounds the priced top-k is the router's skewed choice;
    the call must still come back balanced (the closed-form fallback) and be counted."""
    num_experts, top_k, ep, n = 16, 2, 4, 64
    policy = build_policy(name, price_steps=0, repair_rounds=0)
    ids_in, w_in, logits = router_outputs(n, num_experts, top_k, 6.0, seed=3)
    ids, _ = policy(ids_in, w_in, logits, RoutingContext(layer=0, num_experts=num_experts, top_k=top_k, ep_size=ep))
    load = expert_loads(ids, num_experts)
    assert policy.fallback_calls() == 1
    assert int(load.max()) == int(load.min()) == n * top_k // num_experts
    assert (ids.sort(dim=1).values.diff(dim=1) != 0).all()


@pytest.mark.parametrize("name", ["optimal_balanced", "rank_balanced"])
def test_keeps_more_of_the_router_than_greedy(name: str) -> None:
    num_experts, top_k, n = 64, 8, 1024
    ids_in, w_in, logits = router_outputs(n, num_experts, top_k, 2.0, seed=5)
    ctx = RoutingContext(layer=0, num_experts=num_experts, top_k=top_k, ep_size=8)

    def kept(policy_name: str) -> float:
        ids, _ = build_policy(policy_name)(ids_in, w_in, logits, ctx)
        return (ids[:, :, None] == ids_in[:, None, :]).any(-1).float().mean().item()

    assert kept(name) > kept("greedy_balanced") + 0.05


def test_ids_come_best_first_and_weights_follow_the_option() -> None:
    """weights=keep hands the router's slot-j weight to slot j, so slot 0 must hold the best expert kept."""
    ids_in, w_in, logits = router_outputs(96, 16, 4, 3.0, seed=1)
    ctx = RoutingContext(layer=0, num_experts=16, top_k=4, ep_size=4)
    for name in ("optimal_balanced", "rank_balanced"):
        ids, weights = build_policy(name)(ids_in, w_in, logits, ctx)
        chosen = logits.gather(1, ids.long())  # [N, k]
        assert (chosen.diff(dim=1) <= 0).all(), name
        assert torch.equal(weights, w_in)
        _, uniform = build_policy(name, weights="uniform")(ids_in, w_in, logits, ctx)
        assert torch.allclose(uniform, torch.full_like(w_in, 0.25))


def test_rank_balanced_at_ep1_keeps_the_router() -> None:
    """One rank holds every expert: rank balance constrains nothing, so the router's top-k stays."""
    ids_in, w_in, logits = router_outputs(200, 32, 4, 3.0, seed=2)
    ids, _ = build_policy("rank_balanced")(ids_in, w_in, logits, RoutingContext(layer=0, num_experts=32, top_k=4))
    assert torch.equal(ids.sort(dim=1).values, ids_in.sort(dim=1).values)


def test_token_offset_as_device_tensor() -> None:
    """A 0-d tensor offset (CUDA-graph replay) is accepted; these policies balance each call alone."""
    ids_in, w_in, logits = router_outputs(50, 64, 8, 1.0, seed=0)
    for name in ("optimal_balanced", "rank_balanced"):
        policy = build_policy(name)
        a, _ = policy(ids_in, w_in, logits, RoutingContext(layer=2, num_experts=64, top_k=8, ep_size=4, token_offset=77))
        b, _ = policy(ids_in, w_in, logits, RoutingContext(layer=2, num_experts=64, top_k=8, ep_size=4,
                                                           token_offset=torch.tensor(77)))
        assert torch.equal(a, b), name


def test_registered_and_parameters_checked() -> None:
    assert {"optimal_balanced", "rank_balanced"} <= set(available_policies())
    for name, params, key in [("rank_balanced", {"tolerance": -0.1}, "tolerance"),
                              ("rank_balanced", {"expert_cap": 0.5}, "expert_cap"),
                              ("rank_balanced", {"tolerance": "big"}, "tolerance"),
                              ("optimal_balanced", {"keep_bonus": float("inf")}, "keep_bonus"),
                              ("optimal_balanced", {"price_steps": -1}, "price_steps"),
                              ("rank_balanced", {"repair_rounds": 2.5}, "repair_rounds"),
                              ("optimal_balanced", {"tolerance": 0.1}, "tolerance")]:
        with pytest.raises(PolicyConfigError, match=key):
            build_policy(name, **params)


def test_rank_balanced_price_steps_by_kind_of_call() -> None:
    """Auto: 5 steps for exact shares without a group limit or expert cap (measured as cheap and
    as good there), 20 for the rest; an explicit count applies to every call."""
    from server.moe.routing.rank_balanced import FREE_PRICE_STEPS

    plain = RoutingContext(layer=0, num_experts=16, top_k=2, ep_size=4)
    grouped = RoutingContext(layer=0, num_experts=16, top_k=2, ep_size=4, router_groups=4, router_topk_groups=2)
    auto = build_policy("rank_balanced")
    assert auto.params()["price_steps"] is None
    assert (auto.steps(plain), auto.steps(grouped)) == (FREE_PRICE_STEPS, 20) and FREE_PRICE_STEPS == 5
    assert build_policy("rank_balanced", tolerance=0.1).steps(plain) == 20
    assert build_policy("rank_balanced", expert_cap=1.5).steps(plain) == 20
    fixed = build_policy("rank_balanced", price_steps=12)
    assert (fixed.steps(plain), fixed.steps(grouped), fixed.params()["price_steps"]) == (12, 12, 12)
    assert build_policy("optimal_balanced").steps(plain) == 20


@st.composite
def grouped_calls(draw):
    """A call after a group-limited router: E = groups x group size, ranks dividing E."""
    groups = draw(st.sampled_from([2, 4, 8]))
    per_group = draw(st.integers(2, 8))  # the router rule ranks groups by their two best experts
    num_experts = groups * per_group
    ep = draw(st.sampled_from([d for d in (1, 2, 4, 8, 16) if num_experts % d == 0]))
    topk_groups = draw(st.integers(1, groups))
    top_k = draw(st.integers(1, min(8, topk_groups * per_group)))
    n = draw(st.integers(1, 48))
    return groups, topk_groups, num_experts, ep, top_k, n, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=grouped_calls(), tolerance=st.sampled_from([0.0, 0.2]))
def test_rank_balance_is_exact_under_group_limits(call, tolerance: float) -> None:
    """Rank balance holds whatever the group limit; the limit holds in every call that did not
    fall back (tests/routing/test_capacity_groups.py: which layouts never fall back)."""
    from server.moe.router import sigmoid_group_topk
    from server.moe.routing.group_limit import within_group_limit

    groups, topk_groups, num_experts, ep, top_k, n, seed = call
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_experts, generator=g) + 2 * torch.linspace(1, 0, num_experts)
    weights, ids_in = sigmoid_group_topk(logits, top_k, correction_bias=torch.zeros(num_experts), num_groups=groups,
                                         topk_groups=topk_groups, renormalize=True, scaling_factor=1.0)
    policy = build_policy("rank_balanced", tolerance=tolerance)
    ctx = RoutingContext(layer=0, num_experts=num_experts, top_k=top_k, ep_size=ep, router_groups=groups,
                         router_topk_groups=topk_groups)
    ids, _ = policy(ids_in.to(torch.int32), weights, logits.sigmoid(), ctx)
    assert (ids.sort(dim=1).values.diff(dim=1) != 0).all()
    pairs = n * top_k
    rank_load = expert_loads(ids, num_experts).view(ep, -1).sum(1)
    if tolerance == 0:
        assert int(rank_load.min()) >= pairs // ep and int(rank_load.max()) <= -(-pairs // ep), rank_load
    else:
        assert int(rank_load.max()) <= policy.capacities(n, ctx).ceiling, rank_load
    if policy.fallback_calls() == 0:
        assert within_group_limit(ids, num_experts, groups, topk_groups).all()
