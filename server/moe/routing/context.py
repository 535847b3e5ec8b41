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

    `router_groups` / `router_topk_groups`: the router's group limit (DeepSeek-V3's n_group /
    topk_group: a token's experts come from at most topk_group of n_group equal groups); 1 / 1
    for routers without one. Policies that re-assign experts keep it.
    """

    layer: int
    num_experts: int
    top_k: int
    ep_rank: int = 0
    ep_size: int = 1
    token_offset: IntOrTensor = 0
    seed: int = 0
    router_groups: int = 1
    router_topk_groups: int = 1

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
        if self.router_groups <= 0 or self.num_experts % self.router_groups:
            raise ValueError(f"router_groups={self.router_groups} must be positive and divide num_experts={self.num_experts}")
        if not 1 <= self.router_topk_groups <= self.router_groups:
            raise ValueError(f"router_topk_groups={self.router_topk_groups} outside [1, router_groups={self.router_groups}]")

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size
