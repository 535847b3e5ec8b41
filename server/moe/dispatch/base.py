"""What every dispatcher offers the MoE layer, and the settings that pick one.

A dispatcher takes this rank's tokens x [N, H] with their expert ids and weights [N, k],
runs every (token, expert) pair on the rank owning the expert, and returns the weighted sum
per token [N, H] on the token's own rank. Per step the model asks it once for `step_rows`:
the row count every EP rank passes as `rows` to each MoE layer of that step (the largest
rank's tokens, or the decode bucket), so fixed-size collectives line up on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..experts import LocalExperts
from .wire import WIRES


class Dispatcher(Protocol):
    name: str
    ep_size: int
    collective: bool  # runs collectives: every EP rank must call it in every MoE layer of every step

    def step_rows(self, num_tokens: int, planned: int | None, device: torch.device) -> int | None:
        """The common row count of this step (`planned` when the scheduler sent one; else
        agreed on with the other ranks, a host sync), or None where none is needed."""

    def graph_safe(self, rows: int) -> bool:
        """Steps of `rows` rows make no host sync and have fixed shapes: CUDA graphs can capture them."""

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: LocalExperts, *,
                 valid: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
        """x [N, H], ids/weights [N, k], valid [N] bool (False: a padding row) -> [N, H]."""


@dataclass(frozen=True)
class DispatchSettings:
    """Which dispatcher a model uses (parallel.dispatch), chosen once when the model is built.

    name: auto (ep_size 1: local; else allgather for steps of at most `fixed_max_rows` rows per
          rank, alltoall above), local, allgather (fixed capacity, graph-safe; at ep_size 1 it
          runs over a size-1 process group: the EP path measured on one GPU), alltoall
          (variable splits: a host sync per layer, eager only).
    fixed_max_rows: the engine's prefill chunk (engine.max_num_batched_tokens) bounds every
          step it plans, so by default every engine step takes the fixed-capacity path.
    wire: how the fixed-capacity path (allgather, and auto's steps up to fixed_max_rows) sends
          hidden rows: bf16 (the activation dtype as is) or fp8 (e4m3 codes and a scale per 128
          channels, about half the bytes; wire.py). alltoall always sends the activation dtype.
    """

    name: str = "auto"
    fixed_max_rows: int = 4096
    wire: str = "bf16"

    def __post_init__(self) -> None:
        if self.wire not in WIRES:
            raise ValueError(f"dispatch wire must be one of {WIRES}, got {self.wire!r}")
        if not isinstance(self.fixed_max_rows, int) or self.fixed_max_rows < 1:
            raise ValueError(f"dispatch fixed_max_rows must be a positive integer, got {self.fixed_max_rows!r}")
