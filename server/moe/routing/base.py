"""The routing-policy contract and the shared `weights` option.

A policy rewrites the router's top-k choice before tokens are dispatched:

    policy(topk_ids[N,k] int32, topk_weights[N,k], router_logits[N,E], ctx) -> (ids[N,k] int32, weights[N,k])

Every policy, on every device: k distinct experts in [0, E) per token; N = 0 works; output is
deterministic for a given seed, layer and EP rank; no host synchronisation and no cache that
grows with the number of distinct N seen, so a call can be captured in a CUDA graph.
Returned tensors are read-only for the caller: a policy may return a view of its own
preallocated buffers (round_robin_balanced does), so never modify ids or weights in place.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from .context import RoutingContext

WEIGHT_MODES = ("keep", "uniform")
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit signed seed: what every layer below can carry


class PolicyConfigError(ValueError):
    """A policy was asked for with parameters it cannot honour (raised at start-up)."""


class RoutingPolicy:
    """Base class for routing policies.

    Subclasses implement `route` (new ids only); the base class applies the `weights` option:
    `keep` passes the router's weights through by slot position (what LightLLM does) and
    `uniform` gives every selected expert 1/k.
    """

    name: ClassVar[str] = ""
    #: What this policy guarantees about balance, shown in GetModelInfo and the README table.
    guarantee: ClassVar[str] = ""
    #: False for policies that work host-side (routing=record): decode then stays eager.
    graph_safe: ClassVar[bool] = True
    #: True: `router_logits` is handed over as the router rule's selection scores (the values its
    #: top-k ranks, server/moe/router.py SELECTION_SCORES) instead of the raw gate logits.
    wants_selection_scores: ClassVar[bool] = False
    #: True for policies that write or read the file `routing.path` names (record, replay): the
    #: server's config may choose them, a live switch from the API may not (worker/policy_switch.py).
    uses_files: ClassVar[bool] = False

    def __init__(self, weights: str = "keep", seed: int = 0) -> None:
        if weights not in WEIGHT_MODES:
            raise PolicyConfigError(f"routing.weights must be one of {WEIGHT_MODES}, got {weights!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX:
            raise PolicyConfigError(f"routing.seed must be an integer in [-2**63, 2**63 - 1], got {seed!r}")
        self.weights = weights
        self.seed = seed

    def __call__(
        self,
        topk_ids: torch.Tensor,  # [N, k] int32 (any integer dtype accepted)
        topk_weights: torch.Tensor,  # [N, k] float
        router_logits: torch.Tensor,  # [N, E] float
        ctx: RoutingContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.route(topk_ids, topk_weights, router_logits, ctx)  # [N, k] int32
        return ids, self.weigh(topk_weights, ctx)

    def weigh(self, topk_weights: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        """[N, k] the weights that go with the new ids: the router's by slot (`keep`) or 1/k."""
        if self.weights == "uniform":
            return torch.full_like(topk_weights, 1.0 / ctx.top_k)
        return topk_weights

    def call_ranks(self, calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, RoutingContext]]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The policy on several independent calls at once: [(topk_ids, topk_weights,
        router_logits, ctx)] -> [(ids, weights)], each exactly what `self(*call)` returns.

        For callers that hold every EP rank's router output in one process (the EP what-if).
        This default calls them one after the other; a policy whose call is many small device
        ops (the capacity solvers) overrides it to run same-shaped calls as one batch."""
        return [self(*call) for call in calls]

    def route(
        self,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        router_logits: torch.Tensor,
        ctx: RoutingContext,
    ) -> torch.Tensor:
        raise NotImplementedError

    def validate(self, num_experts: int, top_k: int, ep_size: int, num_layers: int | None = None) -> None:
        """Raise PolicyConfigError if this policy cannot serve a model of this shape
        (`num_layers`: the model's MoE layers, when known).

        Called once at start-up, so an impossible combination stops the server with a message
        naming the keys instead of failing inside the first forward pass.
        """

    def release(self) -> None:
        """Give back what the policy holds (open files, device tables) when the engine stops
        using it: a policy switched away from must not keep a file descriptor per switch."""

    def params(self) -> dict[str, Any]:
        """The parameters this policy was built with (for GetModelInfo and logs)."""
        return {"weights": self.weights, "seed": self.seed}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})"
