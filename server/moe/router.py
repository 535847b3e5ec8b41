"""Router rules: router logits -> the model's own top-k (weights, ids), before any policy.

Each family names its rule; the math follows transformers exactly:
  softmax_topk        softmax in float32, top-k on the probabilities, optional renormalisation,
                      then the weights' dtype (Qwen-MoE, Mixtral, OLMoE)
  sigmoid_group_topk  DeepSeek-V3 / Kimi-K2: sigmoid scores, a per-expert correction bias that
                      steers the choice only, top-k restricted to the best groups of experts,
                      weights from the unbiased scores (renormalised, then scaled)
Routing policies run after the rule, on its ids (server/moe/layer.py).

Each rule also names its *selection scores* (SELECTION_SCORES): the [N, E] values its top-k
ranks, which policies that re-assign experts to keep as much of the router's intent as they can
(`optimal_balanced`, `rank_balanced`) maximise over the pairs they choose.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..registry import Registry

RouterRule = Callable[..., tuple[torch.Tensor, torch.Tensor]]
#: rule name (a family's `router_rule`) -> (router_logits [N, E], top_k, renormalize=, float32_weights=) -> (weights, ids)
ROUTER_RULES: Registry[RouterRule] = Registry("router rule")


#: rule name -> (router_logits [N, E], **the rule's options) -> [N, E] float32 selection scores
SELECTION_SCORES: Registry[Callable[..., torch.Tensor]] = Registry("router selection scores")


def register_router(name: str) -> Callable[[RouterRule], RouterRule]:
    """Function decorator: make a router rule selectable by name."""
    return ROUTER_RULES.register(name)


def register_selection_scores(name: str) -> Callable:
    """Function decorator: the selection scores of router rule `name`."""
    return SELECTION_SCORES.register(name)


@register_selection_scores("softmax_topk")
def softmax_selection_scores(router_logits: torch.Tensor, **_options) -> torch.Tensor:
    """The logits themselves: a token's log-probabilities are its logits minus one per-token
    constant, so over any k experts per token both sums rank assignments identically, and the
    logits cost no [N, E] log-softmax."""
    return router_logits.float()


@register_selection_scores("sigmoid_group_topk")
def sigmoid_selection_scores(router_logits: torch.Tensor, *, correction_bias: torch.Tensor, **_options) -> torch.Tensor:
    """sigmoid(logits) + correction bias: what DeepSeek-V3's top-k ranks (group limits are the
    policy's to keep: RoutingContext.router_groups / router_topk_groups)."""
    return router_logits.float().sigmoid() + correction_bias


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


@register_router("sigmoid_group_topk")
def sigmoid_group_topk(
    router_logits: torch.Tensor,  # [N, E] float32 (the gate runs in float32)
    top_k: int,
    *,
    correction_bias: torch.Tensor,  # [E] float32 e_score_correction_bias
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> weights [N, k] float32, ids [N, k] int64: transformers' DeepseekV3TopkRouter.

    The bias only decides *which* experts win (it balances load during training); the weights
    come from the plain sigmoid scores. Experts are split into `num_groups` equal groups, each
    group is ranked by the sum of its two best biased scores, and only the `topk_groups` best
    groups compete for the k slots. Operations and their order follow transformers, so ties
    (torch.topk with sorted=False) resolve identically.
    """
    n, num_experts = router_logits.shape
    scores = router_logits.float().sigmoid()  # [N, E]
    choice = scores + correction_bias  # [N, E] selection scores only
    per_group = num_experts // num_groups
    group_scores = choice.view(n, num_groups, per_group).topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]
    group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]  # [N, topk_groups]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [N, G]
    expert_mask = group_mask.unsqueeze(-1).expand(n, num_groups, per_group).reshape(n, num_experts)  # [N, E]
    choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]  # [N, k]
    weights = scores.gather(1, ids)  # [N, k] unbiased
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids
