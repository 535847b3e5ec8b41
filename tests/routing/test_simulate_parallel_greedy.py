"""scripts/simulate_parallel_greedy.py: its parallel formulations must land on the rule's picks."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from server.moe.routing.greedy import greedy_balanced_torch

_path = Path(__file__).resolve().parents[2] / "scripts" / "simulate_parallel_greedy.py"
_spec = importlib.util.spec_from_file_location("simulate_parallel_greedy", _path)
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)


@pytest.mark.parametrize("num_experts,top_k,bias", [(16, 2, 0.0), (64, 8, 0.0), (64, 4, 3.0), (256, 8, 3.0)])
def test_serial_jacobi_and_deferred_acceptance_equal_the_policy(num_experts: int, top_k: int, bias: float) -> None:
    tokens = num_experts // top_k
    gen = torch.Generator().manual_seed(num_experts + top_k)
    scores = (torch.randn(tokens, num_experts, generator=gen) + torch.linspace(-bias, bias, num_experts)).to(torch.bfloat16)
    policy = [set(row) for row in greedy_balanced_torch(scores.float(), top_k).tolist()]
    prefs = sim.round_preferences(scores)
    assert sim.serial_picks(prefs, top_k) == policy
    last = tokens - 2
    jac_iters, jac = sim.jacobi_iterations(prefs, top_k, tokens // 2, last)
    da_iters, da = sim.deferred_acceptance_iterations(prefs, top_k, last)
    assert jac == policy[:last] and da == policy[:last]
    assert 1 <= jac_iters <= last - tokens // 2 + 1 and da_iters >= 1


def test_jacobi_needs_one_pass_when_tokens_do_not_compete() -> None:
    """Disjoint favourites: the first pass is already right and a second confirms it."""
    scores = torch.zeros(4, 16)
    for j in range(4):
        scores[j, 4 * j:4 * j + 4] = 1.0
    prefs = sim.round_preferences(scores)
    iterations, picks = sim.jacobi_iterations(prefs, 4, 0, 4)
    assert picks == [set(range(4 * j, 4 * j + 4)) for j in range(4)] and iterations == 2
    assert sim.deferred_acceptance_iterations(prefs, 4, 4)[0] == 1
