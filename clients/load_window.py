"""The expert load of a stretch of engine steps: the difference of two GetExpertLoad reads.

The counters sum over every step since the last reset, so a stretch of 1-token decode steps
hides inside a long prefill's balance and vice versa. Two reads without a reset, each stamped
with the engine step it was read at, differ by exactly the steps (first.engine_step,
last.engine_step]: their balance, per layer, is what those steps alone did.
"""
from __future__ import annotations

from dataclasses import dataclass

from .types import ExpertLoad


@dataclass(frozen=True)
class LoadWindow:
    first_step: int  # exclusive
    last_step: int  # inclusive
    ep_size: int
    expert_tokens: tuple[tuple[int, ...], ...]  # [layer][expert] assignments in the window
    rank_tokens: tuple[tuple[int, ...], ...]  # [layer][rank]

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step

    def matrix(self) -> list[list[int]]:
        return [list(row) for row in self.expert_tokens]

    def expert_balancedness(self) -> list[float | None]:
        """[layer] mean/max over experts (1.0 perfect; None: nothing routed)."""
        return [_balance(row) for row in self.expert_tokens]

    def rank_balancedness(self) -> list[float | None]:
        """[layer] mean/max over EP ranks (1.0 perfect; None: nothing routed)."""
        return [_balance(row) for row in self.rank_tokens]


def _balance(row: tuple[int, ...]) -> float | None:
    return sum(row) / len(row) / max(row) if row and max(row) > 0 else None


def load_window(first: ExpertLoad, last: ExpertLoad) -> LoadWindow:
    """`last` - `first`, two reads of one server with no reset between (ValueError otherwise)."""
    if first.reset:
        raise ValueError("the first read reset the counters: read it with reset=False")
    if last.engine_step < first.engine_step or (first.num_layers, first.num_experts) != (last.num_layers, last.num_experts):
        raise ValueError("the reads are not of one server in order")
    experts = tuple(tuple(b - a for a, b in zip(x.expert_tokens, y.expert_tokens)) for x, y in zip(first.layers, last.layers))
    ranks = tuple(tuple(b - a for a, b in zip(x.rank_tokens, y.rank_tokens)) for x, y in zip(first.layers, last.layers))
    if any(v < 0 for row in experts for v in row):
        raise ValueError("the counters were reset between the reads (a policy switch or another caller's reset)")
    return LoadWindow(first.engine_step, last.engine_step, last.ep_size, experts, ranks)
