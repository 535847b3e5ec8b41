"""`natural`: the model's own router choice, untouched."""
from __future__ import annotations

import torch

from .base import RoutingPolicy
from .context import RoutingContext
from .registry import register_policy


@register_policy("natural")
class NaturalPolicy(RoutingPolicy):
    guarantee = "none: the router's own choice"

    def route(self, topk_ids, topk_weights, router_logits, ctx: RoutingContext) -> torch.Tensor:
        return topk_ids.to(torch.int32)
