"""parallel.dispatch=auto at ep_size > 1: the fixed-capacity path for every step whose rows
fit its bound, the variable-split path for larger ones.

The bound is the engine's prefill chunk (engine.max_num_batched_tokens), so every step the
scheduler plans takes the fixed-capacity path: decode in CUDA graphs, prefill eagerly with the
same two collectives. Steps built outside the engine (benchmarks, tools) may exceed it; they
then use the variable splits rather than fixed buffers of ep * rows * k slots per rank.
The choice depends only on the step's common row count, so every rank makes the same one.
"""
from __future__ import annotations

import torch

from ..experts import LocalExperts
from .all_gather import GatherDispatcher
from .all_to_all import AllToAllDispatcher


class SizeRoutedDispatcher:
    name = "auto"
    collective = True

    def __init__(self, fixed: GatherDispatcher, variable: AllToAllDispatcher, max_rows: int) -> None:
        self.fixed, self.variable, self.max_rows = fixed, variable, max_rows
        self.ep_size = fixed.ep_size

    def step_rows(self, num_tokens: int, planned: int | None, device: torch.device) -> int:
        return self.fixed.step_rows(num_tokens, planned, device)

    def graph_safe(self, rows: int) -> bool:
        return rows <= self.max_rows

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: LocalExperts, *,
                 valid: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
        if rows is None:
            rows = self.step_rows(x.shape[0], None, x.device)
        if rows <= self.max_rows:
            return self.fixed(x, ids, weights, experts, valid=valid, rows=rows)
        return self.variable(x, ids, weights, experts, valid=valid)
