"""EPLB settings resolved against the served model, and the start-up placement.

`parallel.*` keys (server/config.py) say what the operator wants; `resolve_eplb` checks them
against the model's shape and the EP group size before any rank is spawned, raising
EplbConfigError naming the keys, and the result travels to every rank as a plain frozen
object. Every rank then computes the same start-up placement from the same file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .algorithm import POLICIES
from .placement import ExpertPlacement
from .stats import StatsFileError, read_expert_load


class EplbConfigError(ValueError):
    """An impossible EPLB setting; the message names the parallel.* key(s)."""


@dataclass(frozen=True)
class EplbSettings:
    redundant_experts: int
    stats_path: str | None
    interval: int  # engine steps between online rebalances; 0: never
    policy: str
    num_groups: int
    num_nodes: int

    def initial_placement(self, num_layers: int, num_experts: int, ep_size: int) -> ExpertPlacement:
        """From the stats file if any; else from even loads (copies of the first experts)."""
        if self.stats_path:
            loads = read_expert_load(self.stats_path, num_layers, num_experts)
        else:
            loads = [[1.0] * num_experts for _ in range(num_layers)]
        return self.place(loads, num_experts, ep_size)

    def place(self, loads, num_experts: int, ep_size: int) -> ExpertPlacement:
        return ExpertPlacement.balanced(loads, num_experts=num_experts, redundant=self.redundant_experts, ep_size=ep_size,
                                        policy=self.policy, num_groups=self.num_groups, num_nodes=self.num_nodes)


def _nodes(requested: int, world: int) -> int:
    if requested:
        return requested
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local and local.isdigit() and int(local) > 0 and world % int(local) == 0:
        return world // int(local)
    return 1


def resolve_eplb(parallel, *, num_layers: int, num_experts: int, ep_size: int, model_groups: int = 1) -> EplbSettings | None:
    """`parallel` (ParallelConfig) -> settings checked against the model, or None when EPLB is off."""
    if not parallel.eplb_enabled:
        return None
    r = parallel.redundant_experts
    if (num_experts + r) % ep_size:
        raise EplbConfigError(
            f"the model's {num_experts} experts + parallel.redundant_experts={r} = {num_experts + r} physical slots "
            f"do not divide by parallel.ep_size={ep_size}; use a multiple of {ep_size} for parallel.redundant_experts"
        )
    groups = parallel.eplb_num_groups or model_groups
    nodes = _nodes(parallel.eplb_num_nodes, ep_size)
    if parallel.eplb_policy not in POLICIES:
        raise EplbConfigError(f"parallel.eplb_policy={parallel.eplb_policy!r} is not one of {POLICIES}")
    if ep_size % nodes:
        raise EplbConfigError(f"parallel.eplb_num_nodes={nodes} does not divide parallel.ep_size={ep_size}")
    hierarchical = parallel.eplb_policy == "hierarchical" or (parallel.eplb_policy == "auto" and groups % nodes == 0)
    if hierarchical:
        if num_experts % groups:
            raise EplbConfigError(f"parallel.eplb_num_groups={groups} does not divide the model's {num_experts} experts")
        if groups % nodes:
            raise EplbConfigError(f"parallel.eplb_policy=hierarchical needs parallel.eplb_num_nodes={nodes} to divide "
                                  f"parallel.eplb_num_groups={groups}")
    settings = EplbSettings(r, parallel.eplb_stats, parallel.eplb_interval, parallel.eplb_policy, groups, nodes)
    if settings.stats_path:
        try:
            read_expert_load(settings.stats_path, num_layers, num_experts)
        except StatsFileError as exc:
            raise EplbConfigError(f"parallel.eplb_stats: {exc}") from None
    return settings
