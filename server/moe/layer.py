"""One MoE block: gate -> router top-k -> routing policy -> (EPLB replica choice) -> load
counters -> dispatch -> local experts -> combine -> (shared expert). Policies choose logical
experts; with EPLB (runtime.replicas) each pick then goes to one physical copy, and dispatch
works on physical slots. What all layers share lives in runtime.py: the model's MoERuntime
(held) and each forward's MoEStepContext (passed in)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.backend import KernelBackend
from ..layers.mlp import GatedMLP
from .experts import LocalExperts
from .router import ROUTER_RULES
from .runtime import MoERuntime, MoEStepContext


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
        shared_intermediate: int = 0,
        dtype=None,
        device=None,
        kernels: KernelBackend | None = None,
    ) -> None:
        super().__init__()
        self.moe_index, self.num_experts, self.top_k = moe_index, num_experts, top_k
        self.runtime = runtime
        self.router = ROUTER_RULES[router_rule]
        self.renormalize, self.float32_router_weights = renormalize, float32_router_weights
        per_rank = (runtime.num_slots or num_experts) // runtime.ep_size
        kw = dict(dtype=dtype, device=device)
        self.gate = nn.Linear(hidden, num_experts, bias=False, **kw)  # router: [E, H]
        self.experts = LocalExperts(per_rank, hidden, intermediate, act, first_expert=runtime.ep_rank * per_rank,
                                    kernels=kernels, **kw)
        if shared_intermediate:
            self.shared_expert = GatedMLP(hidden, shared_intermediate, act, **kw)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False, **kw)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor, step: MoEStepContext) -> torch.Tensor:
        """x [N, H] -> [N, H]; `step`: this forward's routing contexts and real rows."""
        rt = self.runtime
        router_logits = self.gate(x)  # [N, E]
        topk_weights, topk_ids = self.router(
            router_logits, self.top_k, renormalize=self.renormalize, float32_weights=self.float32_router_weights
        )  # [N, k] each
        ctx = step.routing[self.moe_index]
        ids, weights = rt.policy(topk_ids.to(torch.int32), topk_weights, router_logits, ctx)  # [N, k] each
        if rt.replicas is None:
            rt.counters.record(self.moe_index, ids, valid=step.valid_rows)
        else:
            physical = rt.replicas(self.moe_index, ids, ctx.token_offset)  # [N, k] slots
            rt.counters.record(self.moe_index, ids, valid=step.valid_rows, physical_ids=physical)
            ids = physical
        out = rt.dispatcher(x, ids, weights, self.experts)  # [N, H]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
