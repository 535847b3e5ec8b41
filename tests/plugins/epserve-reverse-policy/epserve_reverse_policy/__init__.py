"""A third-party routing policy: mirror each router choice to expert (E - 1 - id + shift) % E.

Registered only through its entry point (no decorator), the way an out-of-tree package would.
"""
import torch

from server.moe.routing import RoutingPolicy


class ReverseExpertPolicy(RoutingPolicy):
    guarantee = "none (test plugin)"

    def __init__(self, weights: str = "keep", seed: int = 0, shift: int = 0) -> None:
        super().__init__(weights=weights, seed=seed)
        self.shift = shift

    def params(self):
        return {**super().params(), "shift": self.shift}

    def route(self, topk_ids, topk_weights, router_logits, ctx):
        return ((ctx.num_experts - 1 - topk_ids.long() + self.shift) % ctx.num_experts).to(torch.int32)
