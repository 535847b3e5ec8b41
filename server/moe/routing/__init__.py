"""Routing policies: rewrite the router's top-k expert choice before dispatch.

Public names for plugin authors and tools:
  register_policy   class decorator registering a RoutingPolicy under a name (and aliases)
  build_policy      build_policy(name, **params) -> policy(topk_ids, topk_weights, router_logits, ctx)
  RoutingContext    frozen dataclass: layer, num_experts, top_k, ep_rank, ep_size, token_offset, seed
  RoutingPolicy     base class to subclass (implement `route`)

Beside the policies: hashing.py (the stateless hash behind the random policies),
skew_profiles.py (`skewed`'s popularity profiles and the solve for a target metric),
trace_file.py (the trace `routing=record` writes and `routing=replay` reads) and
routed_layout.py (routed experts as the API returns them, read as a replay trace).
capacity_prices.py, capacity_repair.py and capacity_solver.py solve the capacitated top-k behind
optimal_balanced and rank_balanced (capacity_policy.py, their shared base); group_limit.py keeps
DeepSeek-style group limits.
lightllm_rule.py holds LightLLM's fake-balance rule written plainly (the tests' oracle and the
policy benchmark's baseline); it is not a policy and is not imported here.
"""
from .base import PolicyConfigError, RoutingPolicy, WEIGHT_MODES
from .context import RoutingContext
from .registry import (
    ENTRY_POINT_GROUP,
    UnknownPolicyError,
    available_policies,
    build_policy,
    canonical_name,
    get_policy_class,
    register_policy,
)

# Built-in policies register themselves on import.
from . import natural, round_robin, greedy, uniform_random, skewed, record, replay  # noqa: E402,F401
from . import optimal_balanced, rank_balanced  # noqa: E402,F401

__all__ = [
    "ENTRY_POINT_GROUP",
    "PolicyConfigError",
    "RoutingContext",
    "RoutingPolicy",
    "UnknownPolicyError",
    "WEIGHT_MODES",
    "available_policies",
    "build_policy",
    "canonical_name",
    "get_policy_class",
    "register_policy",
]
