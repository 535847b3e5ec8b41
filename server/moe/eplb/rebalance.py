"""Online rebalancing: new placement from the live counters, weights moved while serving.

Every EP rank calls `rebalance` at the same step boundary (the engine puts it in a step plan).
Each rank sums its logical expert counts since the previous rebalance, one all_reduce makes
those the EP group's counts, and every rank then computes the same placement from the same
numbers (algorithm.py is deterministic). A layer is re-placed only if the new placement
lowers its expected busiest-rank load by at least MIN_GAIN; its expert weights then move
between ranks (transfer.py) and the replica map is rewritten in place. Outputs do not change:
every physical copy of an expert holds the same weights, and a token's result does not depend
on which copy computed it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .placement import max_over_mean
from .settings import EplbSettings
from .transfer import move_layer_experts, plan_layer_moves

log = logging.getLogger(__name__)

MIN_GAIN = 0.01  # re-place a layer only if its expected max rank load drops by >= 1%


@dataclass(frozen=True)
class RebalanceReport:
    """What one rebalance did (identical on every rank except `seconds`)."""

    window_tokens: int  # (token, expert) assignments the new placement was computed from
    layers_changed: int
    experts_moved: int  # expert copies that crossed ranks, all layers
    local_copies: int  # expert copies that changed slots within a rank
    bytes_moved: int  # bytes that crossed ranks, all ranks together
    rank_max_over_mean_before: float  # expected on the window's loads, mean over layers
    rank_max_over_mean_after: float
    seconds: float
    loads: tuple[tuple[int, ...], ...] = ()  # [layer][expert] the window it was computed from
    slots: tuple[tuple[int, ...], ...] = ()  # [layer][physical slot] the placement served after it


class ExpertRebalancer:
    def __init__(self, model, settings: EplbSettings) -> None:
        if model.placement is None:
            raise ValueError("online rebalancing needs a model built with an expert placement")
        self.model, self.settings = model, settings
        self._since = model.load_counters.lifetime_expert_tokens().clone()  # [L, E] at the last rebalance

    def window_loads(self, group: dist.ProcessGroup | None = None) -> list[list[int]]:
        """[L][E] logical counts of the whole EP group since the last rebalance (a collective)."""
        now = self.model.load_counters.lifetime_expert_tokens()
        window = (now - self._since).clone()  # [L, E]
        self._since = now.clone()
        if self.model.ep_size > 1:
            dist.all_reduce(window, group=group)
        return window.cpu().tolist()

    @torch.no_grad()
    def rebalance(self, group: dist.ProcessGroup | None = None, loads: list[list[float]] | None = None) -> RebalanceReport:
        """Every rank must call this together. `loads` [L][E] replaces the live window (tests,
        stats files); it must be the same on every rank."""
        start = time.perf_counter()
        if loads is None:
            loads = self.window_loads(group)
        else:  # the next live window starts here too
            self._since = self.model.load_counters.lifetime_expert_tokens().clone()
        model, old = self.model, self.model.placement
        proposed = self.settings.place(loads, old.num_experts, model.ep_size)
        keep = []  # layers whose proposed placement is not worth the move
        before, after = [], []
        for layer, row in enumerate(loads):
            old_mm = max_over_mean(old.rank_loads(layer, row))
            new_mm = max_over_mean(proposed.rank_loads(layer, row))
            before.append(old_mm)
            worth = sum(row) and new_mm <= old_mm * (1 - MIN_GAIN) and proposed.slots[layer] != old.slots[layer]
            after.append(new_mm if worth else old_mm)
            if not worth:
                keep.append(layer)
        for layer in keep:
            proposed = proposed.with_layer(layer, old.slots[layer])
        changed, moved, local = self.apply(proposed, group)
        experts = model.moe_experts()
        per_expert = experts[0].bytes_per_slot if experts else 0  # codes and scales for FP8 experts
        report = RebalanceReport(
            window_tokens=int(sum(map(sum, loads))), layers_changed=changed, experts_moved=moved, local_copies=local,
            bytes_moved=moved * per_expert, rank_max_over_mean_before=_mean(before), rank_max_over_mean_after=_mean(after),
            seconds=time.perf_counter() - start,
            loads=tuple(tuple(int(x) for x in row) for row in loads), slots=model.placement.slots,
        )
        if model.ep_rank == 0:
            log.info("EPLB rebalance: %d of %d layers re-placed, %d experts moved (%.1f MiB), expected rank max/mean "
                     "%.3f -> %.3f over %d assignments, %.3f s", changed, len(loads), moved, report.bytes_moved / 2**20,
                     report.rank_max_over_mean_before, report.rank_max_over_mean_after, report.window_tokens, report.seconds)
        return report

    @torch.no_grad()
    def apply(self, placement, group: dist.ProcessGroup | None = None) -> tuple[int, int, int]:
        """Move expert weights so the model serves `placement` (every rank together, the same
        placement on each) and point the replica map at it. -> (layers changed, copies that
        crossed ranks, copies within a rank). Rebalances call it with what the window's loads
        propose; tests and tools may force any valid placement."""
        model, old = self.model, self.model.placement
        ep, rank = model.ep_size, model.ep_rank
        experts = model.moe_experts()
        changed = moved = local = 0
        current = old
        for layer in range(len(old.slots)):
            if placement.slots[layer] == old.slots[layer]:
                continue
            moves = plan_layer_moves(old.slots[layer], placement.slots[layer], ep)
            move_layer_experts(experts[layer].slot_tensors(), moves, rank, ep, group)  # every tensor of a slot
            current = current.with_layer(layer, placement.slots[layer])
            changed += 1
            moved += moves.num_transfers
            local += moves.num_local_copies
        if changed:
            model.placement = current
            model.runtime.replicas.update(current)
        return changed, moved, local


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0

