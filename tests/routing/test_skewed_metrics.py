"""`skewed` hits the target in the metric asked for (per-expert max/mean, MaxVio, rank
balancedness), with zipf, log-normal and hot-rank popularity, deterministically per layer and
rank; an unreachable target is refused when the policy is validated."""
from __future__ import annotations

import pytest
import torch

from server.moe.load_stats import balancedness
from server.moe.routing import PolicyConfigError, RoutingContext, build_policy

E, K, EP, TOKENS = 32, 4, 4, 4096  # tokens per rank


def _route(policy, layer: int = 0) -> torch.Tensor:
    """Every rank's tokens routed (rank r starts at global token r * TOKENS) -> [EP * TOKENS, k]."""
    out = []
    for rank in range(EP):
        ctx = RoutingContext(layer=layer, num_experts=E, top_k=K, ep_rank=rank, ep_size=EP, token_offset=rank * TOKENS)
        ids, _ = policy(torch.zeros(TOKENS, K, dtype=torch.int32), torch.ones(TOKENS, K), torch.zeros(TOKENS, E), ctx)
        assert all(len(set(row)) == K for row in ids.tolist())  # k distinct experts per token
        out.append(ids)
    return torch.cat(out)


def _loads(ids: torch.Tensor) -> tuple[list[int], list[int]]:
    experts = torch.bincount(ids.reshape(-1).long(), minlength=E).tolist()
    per = E // EP
    return experts, [sum(experts[r * per:(r + 1) * per]) for r in range(EP)]


@pytest.mark.parametrize("mode", ["zipf", "lognormal"])
@pytest.mark.parametrize("metric,target", [("expert_max_over_mean", 2.5), ("max_vio", 0.8), ("rank_balancedness", 0.75)])
def test_measured_load_reads_the_target(mode, metric, target) -> None:
    policy = build_policy("skewed", mode=mode, metric=metric, target=target, seed=5)
    policy.validate(E, K, EP, num_layers=2)
    for layer in range(2):
        experts, ranks = _loads(_route(policy, layer))
        mean = sum(experts) / E
        measured = {"expert_max_over_mean": max(experts) / mean, "max_vio": max(experts) / mean - 1,
                    "rank_balancedness": balancedness([ranks])[0]}[metric]
        assert measured == pytest.approx(target, rel=0.05, abs=0.02), (layer, experts, ranks)


def test_rank_balancedness_of_hot_ranks() -> None:
    policy = build_policy("skewed", mode="hot_ranks", hot_ranks=1, metric="rank_balancedness", target=0.5)
    policy.validate(E, K, EP)
    _, ranks = _loads(_route(policy))
    assert balancedness([ranks])[0] == pytest.approx(0.5, rel=0.03)


def test_lognormal_is_deterministic_per_layer_and_seed() -> None:
    a = build_policy("skewed", mode="lognormal", target=2.0, seed=1)
    b = build_policy("skewed", mode="lognormal", target=2.0, seed=1)
    c = build_policy("skewed", mode="lognormal", target=2.0, seed=2)
    assert torch.equal(_route(a, 0), _route(b, 0))
    assert not torch.equal(_route(a, 0), _route(a, 1))  # each layer has its own popularity
    assert not torch.equal(_route(a, 0), _route(c, 0))
    p = a.probabilities(RoutingContext(layer=0, num_experts=E, top_k=K, ep_size=EP))
    assert sum(p) == pytest.approx(K) and max(p) <= 1.0


@pytest.mark.parametrize("params,match", [
    ({"metric": "rank_balancedness", "target": 0.1}, "unreachable"),  # below 1/ep_size: impossible
    ({"metric": "rank_balancedness", "target": 1.5}, r"\(0, 1\]"),
    ({"metric": "max_vio", "target": -0.1}, ">= 0"),
    ({"metric": "max_vio", "target": 9.0}, "unreachable"),  # max/mean 10 > E/k = 8
    ({"metric": "nope"}, "routing.metric"),
])
def test_impossible_targets_are_refused(params, match) -> None:
    with pytest.raises(PolicyConfigError, match=match):
        build_policy("skewed", mode="lognormal", **params).validate(E, K, EP, num_layers=1)
