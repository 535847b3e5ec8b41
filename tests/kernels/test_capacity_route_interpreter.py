"""The fused capacity solver (server/moe/kernels/capacity_route.py) against the torch path
under TRITON_INTERPRET=1 on CPU, in one fresh subprocess (support/interpret.py says why). Each
call must keep its balance guarantee, k distinct ids ordered by score, and, where the price
steps leave little to move, return exactly the torch path's ids. With one price step many pairs
are left to move: the kernel's least-loss moves one at a time must still finish and lose no more
than the torch path's parallel rounds. Serving shapes on a GPU: tests/routing/test_capacity_gpu.py;
compiled for sm_90: test_capacity_route_compile_sm90.py."""
from __future__ import annotations

import json

import pytest

from tests.kernels.support.interpret import run_source_in_interpreter

pytest.importorskip("triton")

CASES = [
    {"n": 24, "E": 16, "k": 2, "W": 4, "exact": True, "skew": 2.0},  # rank bins, exact shares
    {"n": 24, "E": 16, "k": 2, "W": 1, "exact": True, "skew": 2.0},  # one expert per bin (optimal_balanced)
    {"n": 20, "E": 16, "k": 4, "W": 4, "exact": False, "skew": 3.0, "ceiling": 22},  # a tolerance ceiling
    {"n": 13, "E": 16, "k": 3, "W": 4, "exact": True, "skew": 1.0},  # k not a power of two, a partial token block
    {"n": 24, "E": 16, "k": 2, "W": 1, "exact": True, "skew": 4.0, "steps": 1},  # most pairs left to the moves
]
RUN = """
import json, torch
from tests.kernels.support.capacity_checks import (check_batch_independent, check_call, check_chunked_bisection,
                                                  check_gain_chunks, check_price_step_chunked, skewed_scores)
for c in json.loads({cases!r}):
    r = check_call(skewed_scores(c["n"], c["E"], c["skew"], 1), c["k"], c["W"], c["exact"], c.get("ceiling", 0),
                   c.get("steps", 20))
    print(json.dumps({{**c, **r}}))
print(json.dumps({{"chunked": [check_chunked_bisection(skewed_scores(24, 16, 2.0, 1), 2, 4, True, 0, 3, 16),
                              check_chunked_bisection(skewed_scores(12, 8, 3.0, 2), 2, 1, False, 4, 2, 8),
                              *(check_price_step_chunked(n, 4, m, cap, s) for s, (n, m, cap) in
                                enumerate([(30, 2, 17), (20, 1, 1), (13, 4, 40), (30, 2, 60)])),
                              check_gain_chunks(skewed_scores(60, 16, 4.0, 3), 2, 1)]}}))
print(json.dumps({{"batch_independent": check_batch_independent(
    torch.stack([skewed_scores(10, 16, 2.0, s) for s in range(2)]), 2, 4)}}))
"""


@pytest.fixture(scope="module")
def results() -> list[dict]:
    out = run_source_in_interpreter(RUN.format(cases=json.dumps(CASES)), timeout_s=900)
    return [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]


def test_guarantees_hold_and_ids_match_the_torch_path(results) -> None:
    # check_call asserted the balance, distinct ids, order and completion of every call
    by_case = results[:len(CASES)]
    assert len(by_case) == len(CASES)
    for case, r in zip(CASES, by_case):
        assert r["objective"] <= r["natural_objective"] + 1e-4
        if case.get("steps", 20) == 20:
            assert r["equal"], r


def test_least_loss_moves_lose_no_more_than_parallel_rounds(results) -> None:
    r = results[len(CASES) - 1]
    assert r["torch_ok"]
    assert r["objective"] >= r["torch_objective"] - 1e-4, r


def test_chunked_bisection_gives_the_in_register_prices(results) -> None:
    assert results[-2] == {"chunked": [True] * 7}


def test_programs_of_one_launch_are_independent(results) -> None:
    assert results[-1] == {"batch_independent": True}
