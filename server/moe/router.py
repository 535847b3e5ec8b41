"""Router rules: router logits -> the model's own top-k (weights, ids), before any policy.

Each family names its rule; the math follows transformers exactly (softmax in float32, top-k
on the probabilities, optional renormalisation, then the weights' dtype). DeepSeek-style
group-limited sigmoid routing will be a second entry here.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..registry import Registry

RouterRule = Callable[..., tuple[torch.Tensor, torch.Tensor]]
#: rule name (a family's `router_rule`) -> (router_logits [N, E], top_k, renormalize=, float32_weights=) -> (weights, ids)
ROUTER_RULES: Registry[RouterRule] = Registry("router rule")


def register_router(name: str) -> Callable[[RouterRule], RouterRule]:
    """Function decorator: make a router rule selectable by name."""
    return ROUTER_RULES.register(name)


@register_router("softmax_topk")
def softmax_topk(
    router_logits: torch.Tensor,  # [N, E] in the model dtype
    top_k: int,
    *,
    renormalize: bool,
    float32_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> weights [N, k] (float32 if `float32_weights`, else the logits' dtype), ids [N, k] int64.

    With renormalisation this equals a softmax over the k largest logits (Mixtral's rule).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [N, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [N, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if not float32_weights:
        weights = weights.to(router_logits.dtype)
    return weights, ids
