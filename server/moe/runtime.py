"""What the MoE layers of one model share: for the model's life (MoERuntime), and for one
forward step (MoEStepContext).

MoERuntime holds the swappable routing policy (every layer reads `runtime.policy`, so one
assignment switches all of them), the load counters, the dispatcher and the EP placement.
MoEStepContext is built once per forward and passed down with the batch, so no layer keeps
per-step state and none rebuilds what every layer needs: the RoutingContext each MoE layer
hands its policy, and which rows of a padded batch are real. Inside a CUDA graph the step
context is built once, at capture; its tensors (token_offset, valid_rows) are the graph's
static buffers, refilled before each replay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .load_stats import ExpertLoadCounters
from .routing import RoutingContext, RoutingPolicy


@dataclass(frozen=True)
class MoEStepContext:
    """Per-step inputs of every MoE layer, built once per forward (MoERuntime.step)."""

    routing: tuple[RoutingContext, ...]  # [MoE layer] what that layer's policy call is told
    #: [N] bool, True for real rows of a padded batch (CUDA-graph buckets): padding rows stay
    #: out of the load counters. None: every row is real.
    valid_rows: torch.Tensor | None = None
    #: the step's common MoE row count (dispatcher.step_rows: every EP rank pads to it); None
    #: where the dispatcher needs none. A host int: it fixes the shapes of the exchange.
    ep_rows: int | None = None

    @property
    def token_offset(self) -> int | torch.Tensor:
        """This rank's first global token index in the step (int, or a 0-d device tensor)."""
        return self.routing[0].token_offset if self.routing else 0


@dataclass
class MoERuntime:
    """State every MoE layer of a model shares: swap the policy here and all layers follow."""

    policy: RoutingPolicy
    counters: ExpertLoadCounters
    dispatcher: Any  # a Dispatcher (server/moe/dispatch/)
    num_layers: int  # MoE layers of the model
    num_experts: int  # logical experts E
    top_k: int
    ep_rank: int = 0
    ep_size: int = 1
    replicas: Any = None  # ReplicaMap (server/moe/eplb) when EPLB places experts; None: blocks of E/ep
    #: [max_tokens, MoE layers, k] int16 while some request of the step wants its routed experts:
    #: every MoE layer writes its logical ids there (server/worker/routed_experts.py); else None
    routed_out: Any = None
    router_groups: int = 1  # the router's group limit (n_group / topk_group), told to every policy call
    router_topk_groups: int = 1

    @property
    def num_slots(self) -> int | None:
        """Physical expert slots per layer with EPLB (E + redundant), else None."""
        return None if self.replicas is None else self.replicas.num_slots

    def step(self, token_offset: int | torch.Tensor = 0, valid_rows: torch.Tensor | None = None,
             ep_rows: int | None = None) -> MoEStepContext:
        """The step context of one forward: `token_offset` as the scheduler planned it (a 0-d
        device tensor under CUDA graphs), `valid_rows` [N] bool for a padded batch (padding
        rows are left out of the counters and the experts), `ep_rows` the common row count."""
        routing = tuple(RoutingContext(layer=i, num_experts=self.num_experts, top_k=self.top_k, ep_rank=self.ep_rank,
                                       ep_size=self.ep_size, token_offset=token_offset,
                                       router_groups=self.router_groups, router_topk_groups=self.router_topk_groups)
                        for i in range(self.num_layers))
        return MoEStepContext(routing, valid_rows, ep_rows)
