"""One MoE block: gate -> router top-k -> routing policy -> (EPLB replica choice) -> load
counters -> dispatch -> local experts -> combine -> (shared expert). Policies choose logical
experts; with EPLB (runtime.replicas) each pick then goes to one physical copy, and dispatch
works on physical slots."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..kernels.backend import KernelBackend
from ..layers.mlp import GatedMLP
from .experts import LocalExperts
from .load_stats import ExpertLoadCounters
from .router import ROUTER_RULES
from .routing import RoutingContext, RoutingPolicy


@dataclass
class MoERuntime:
    """State every MoE layer of a model shares: swap the policy here and all layers follow."""

    policy: RoutingPolicy
    counters: ExpertLoadCounters
    dispatcher: Any  # LocalDispatcher | AllToAllDispatcher (server/moe/dispatch.py)
    ep_rank: int = 0
    ep_size: int = 1
    #: [N] bool, True for real rows, while a padded batch runs (CUDA-graph buckets): padding
    #: rows are left out of the load counters. None: every row is real.
    valid_rows: torch.Tensor | None = None
    replicas: Any = None  # ReplicaMap (server/moe/eplb) when EPLB places experts; None: blocks of E/ep

    @property
    def num_slots(self) -> int | None:
        """Physical expert slots per layer with EPLB (E + redundant), else None."""
        return None if self.replicas is None else self.replicas.num_slots


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

    def forward(self, x: torch.Tensor, token_offset: int | torch.Tensor = 0) -> torch.Tensor:
        """x [N, H] -> [N, H]. `token_offset`: this rank's first global token index in the step."""
        rt = self.runtime
        router_logits = self.gate(x)  # [N, E]
        topk_weights, topk_ids = self.router(
            router_logits, self.top_k, renormalize=self.renormalize, float32_weights=self.float32_router_weights
        )  # [N, k] each
        ctx = RoutingContext(layer=self.moe_index, num_experts=self.num_experts, top_k=self.top_k,
                             ep_rank=rt.ep_rank, ep_size=rt.ep_size, token_offset=token_offset)
        ids, weights = rt.policy(topk_ids.to(torch.int32), topk_weights, router_logits, ctx)  # [N, k] each
        if rt.replicas is None:
            rt.counters.record(self.moe_index, ids, valid=rt.valid_rows)
        else:
            physical = rt.replicas(self.moe_index, ids, token_offset)  # [N, k] slots
            rt.counters.record(self.moe_index, ids, valid=rt.valid_rows, physical_ids=physical)
            ids = physical
        out = rt.dispatcher(x, ids, weights, self.experts)  # [N, H]
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
