"""`python -m server routing=fake_balance`: GetModelInfo names the canonical policy
(greedy_balanced) and GetExpertLoad shows balanced counts after a generation."""
from __future__ import annotations

from math import lcm

import pytest

from clients import Client
from tests.helpers.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("fake_balance"), "routing=fake_balance") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


def test_counters_start_at_zero_after_the_warm_up(server, client):
    """The server warms up with a short generation before SERVING, then zeroes the counters."""
    assert "warm-up generation done" in server.log()
    load = client.expert_load()
    assert all(sum(layer.expert_tokens) == 0 for layer in load.layers) and load.tokens_per_layer == 0


def test_model_info_reports_greedy_balanced(client):
    info = client.info()
    assert info.routing.name == "greedy_balanced"
    assert "±1" in info.routing.guarantee
    assert info.routing.params.get("weights") == "keep"


def test_expert_load_is_balanced_after_a_generation(client):
    info = client.info()
    e, k = info.num_experts, info.top_k
    n = 3 * lcm(e, k) // k + 1  # three full rounds of the balanced walk plus one token
    client.expert_load(reset=True)
    out = client.generate(list(range(1, n + 1)), max_new_tokens=1)  # exactly one forward (the prefill)
    assert out.usage.completion_tokens == 1
    load = client.expert_load(reset=True)
    assert load.num_layers == info.num_moe_layers
    for layer in load.layers:
        assert sum(layer.expert_tokens) == n * k
        assert max(layer.expert_tokens) - min(layer.expert_tokens) <= 1, layer.expert_tokens
        assert layer.rank_tokens == (n * k,)
    assert load.expert_max_over_mean == pytest.approx(max(layer.expert_max_over_mean for layer in load.layers))
    assert load.expert_max_over_mean < 1.0 + e / (n * k) + 1e-9
