"""What a routing policy knows about the call it serves."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

IntOrTensor = Union[int, torch.Tensor]


@dataclass(frozen=True)
class RoutingContext:
    """Where in the model and the EP group a routing call happens.

    `token_offset` is this rank's first global token index in the step: the scheduler's step
    plan knows every rank's token count, so rank r gets the sum of the counts of ranks < r.
    It may be a 0-d integer tensor on the device instead of an int, so that a CUDA graph
    captured once reads the current value at replay instead of a baked-in constant.
    """

    layer: int
    num_experts: int
    top_k: int
    ep_rank: int = 0
    ep_size: int = 1
    token_offset: IntOrTensor = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.ep_size <= 0 or self.num_experts % self.ep_size:
            raise ValueError(
                f"ep_size={self.ep_size} must be positive and divide num_experts={self.num_experts}"
            )
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank={self.ep_rank} outside [0, ep_size={self.ep_size})")

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size
