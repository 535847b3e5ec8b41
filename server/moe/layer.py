"""One MoE block: gate -> router top-k (the family's rule, router.py) -> routing policy -> (EPLB
replica choice) -> load counters -> dispatch -> local experts -> combine -> (shared experts).
Policies choose logical experts; with EPLB (runtime.replicas) each pick then goes to one
physical copy, and dispatch works on physical slots. What all layers share lives in
runtime.py: the model's MoERuntime (held) and each forward's MoEStepContext (passed in)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.backend import KernelBackend
from ..layers.mlp import GatedMLP
from .experts import LocalExperts
from .router import ROUTER_RULES, SELECTION_SCORES
from .runtime import MoERuntime, MoEStepContext


class BiasedRouterGate(nn.Module):
    """DeepSeek-V3's gate: logits computed in float32 (x and weight upcast, as transformers does)
    and a float32 per-expert correction bias that the router rule adds for selection only."""

    def __init__(self, hidden: int, num_experts: int, dtype=None, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype, device=device))  # [E, H]
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32, device=device),
                                                    requires_grad=False)  # [E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, E] float32
        return F.linear(x.float(), self.weight.float())


#: router rules whose gate is a BiasedRouterGate (float32 logits; the rule gets its correction bias)
_BIASED_RULES = ("sigmoid_group_topk",)


class MoELayer(nn.Module):
    def __init__(
        self,
        *,
        moe_index: int,
        hidden: int,
        num_experts: int,
        top_k: int,
        intermediate: int,
        act: str,
        runtime: MoERuntime,
        renormalize: bool,
        float32_router_weights: bool = False,
        router_rule: str = "softmax_topk",
        router_options: dict | None = None,
        shared_intermediate: int = 0,
        shared_gated: bool = True,
        dtype=None,
        device=None,
        kernels: KernelBackend | None = None,
    ) -> None:
        super().__init__()
        self.moe_index, self.num_experts, self.top_k = moe_index, num_experts, top_k
        self.runtime = runtime
        self.router = ROUTER_RULES[router_rule]  # an unknown name lists the known rules
        self.selection_scores = SELECTION_SCORES[router_rule]
        self.biased_gate = router_rule in _BIASED_RULES
        if self.biased_gate:  # DeepSeek-V3: groups, scaling factor (router_options), bias read per call
            self.router_options = {"renormalize": renormalize, **(router_options or {})}
        else:
            self.router_options = {"renormalize": renormalize, "float32_weights": float32_router_weights,
                                   **(router_options or {})}
        per_rank = (runtime.num_slots or num_experts) // runtime.ep_size
        kw = dict(dtype=dtype, device=device)
        if self.biased_gate:
            self.gate = BiasedRouterGate(hidden, num_experts, **kw)
        else:
            self.gate = nn.Linear(hidden, num_experts, bias=False, **kw)  # router: [E, H]
        self.experts = LocalExperts(per_rank, hidden, intermediate, act, first_expert=runtime.ep_rank * per_rank,
                                    kernels=kernels, **kw)
        # transformers' names: Qwen2-MoE mlp.shared_expert (+ sigmoid shared_expert_gate); DeepSeek mlp.shared_experts
        self.shared_expert = self.shared_experts = None
        if shared_intermediate and shared_gated:
            self.shared_expert = GatedMLP(hidden, shared_intermediate, act, **kw)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False, **kw)
        elif shared_intermediate:
            self.shared_experts = GatedMLP(hidden, shared_intermediate, act, **kw)

    def forward(self, x: torch.Tensor, step: MoEStepContext) -> torch.Tensor:
        """x [N, H] -> [N, H]; `step`: this forward's routing contexts and real rows."""
        rt = self.runtime
        router_logits = self.gate(x)  # [N, E]
        extra = {"correction_bias": self.gate.e_score_correction_bias} if self.biased_gate else {}
        topk_weights, topk_ids = self.router(router_logits, self.top_k, **self.router_options, **extra)  # [N, k] each
        ctx = step.routing[self.moe_index]
        scores = router_logits
        if getattr(rt.policy, "wants_selection_scores", False):  # a Python attribute: a graph bakes the choice in
            scores = self.selection_scores(router_logits, **self.router_options, **extra)  # [N, E]
        ids, weights = rt.policy(topk_ids.to(torch.int32), topk_weights, scores, ctx)  # [N, k] each
        if rt.routed_out is not None:  # logical ids, before EPLB; a Python check, so graphs bake it in or out
            rt.routed_out[:ids.shape[0], self.moe_index].copy_(ids)
        if rt.replicas is None:
            rt.counters.record(self.moe_index, ids, valid=step.valid_rows)
        else:
            physical = rt.replicas(self.moe_index, ids, ctx.token_offset)  # [N, k] slots
            rt.counters.record(self.moe_index, ids, valid=step.valid_rows, physical_ids=physical)
            ids = physical
        out = rt.dispatcher(x, ids, weights, self.experts, valid=step.valid_rows, rows=step.ep_rows)  # [N, H]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
