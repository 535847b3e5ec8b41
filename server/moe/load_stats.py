"""Per-layer, per-expert token counters kept on the device.

Updated inside the forward with scatter-adds only (no host sync, CUDA-graph safe), read and
reduced across EP ranks only when someone asks (GetExpertLoad, metrics, the benchmark).

Expert counts are always in logical experts (the model's E, whatever copies EPLB keeps).
With EPLB (server/moe/eplb) the counters also keep physical-slot counts, so per-rank load
is what each rank really computed: its slots' counts, replicas included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ExpertLoadSnapshot:
    """Counts since the last reset, summed over EP ranks (host-side plain data)."""

    expert_tokens: list[list[int]]  # [layer][expert] (token, expert) assignments
    tokens: list[int]  # [layer] tokens routed
    ranks_touched: list[int]  # [layer] sum over tokens of distinct EP ranks its experts live on
    ep_size: int
    physical_tokens: list[list[int]] | None = None  # [layer][physical slot] with EPLB, else None
    engine_step: int = 0  # forward steps run when read (the counts include that step); set by the core

    @property
    def num_layers(self) -> int:
        return len(self.expert_tokens)

    @property
    def num_experts(self) -> int:
        return len(self.expert_tokens[0]) if self.expert_tokens else 0

    def rank_tokens(self) -> list[list[int]]:
        """[layer][rank] assignments each rank computed: its block of experts, or with EPLB
        its physical slots (slot q on rank q // (slots / ep_size))."""
        rows = self.expert_tokens if self.physical_tokens is None else self.physical_tokens
        per = len(rows[0]) // self.ep_size if rows else 0
        return [[sum(row[r * per:(r + 1) * per]) for r in range(self.ep_size)] for row in rows]

    def rank_active_experts(self) -> list[list[int]]:
        """[layer][rank] experts (with EPLB: physical slots) on each rank that got >= 1 token."""
        rows = self.expert_tokens if self.physical_tokens is None else self.physical_tokens
        per = len(rows[0]) // self.ep_size if rows else 0
        return [[sum(1 for c in row[r * per:(r + 1) * per] if c) for r in range(self.ep_size)] for row in rows]

    def expert_max_over_mean(self) -> list[float]:
        return [_max_over_mean(row) for row in self.expert_tokens]

    def rank_max_over_mean(self) -> list[float]:
        return [_max_over_mean(row) for row in self.rank_tokens()]

    def balancedness(self) -> dict[str, dict[str, float | None]]:
        """Mean/max load per layer over EP ranks and over experts, aggregated over layers
        (see `balancedness`): {"rank": {"min", "p50", "p90", "avg"}, "expert": {...}}."""
        return {"rank": aggregate_layers(balancedness(self.rank_tokens())),
                "expert": aggregate_layers(balancedness(self.expert_tokens))}

    def mean_ranks_per_token(self) -> list[float]:
        return [r / t if t else 0.0 for r, t in zip(self.ranks_touched, self.tokens)]

    def summary(self) -> dict[str, float]:
        """Whole-model figures: the mean over layers of each per-layer ratio."""
        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else 0.0

        return {
            "expert_max_over_mean": mean(self.expert_max_over_mean()),
            "rank_max_over_mean": mean(self.rank_max_over_mean()),
            "mean_ranks_per_token": mean(self.mean_ranks_per_token()),
            "tokens": float(sum(self.tokens) / max(self.num_layers, 1)),
        }


def _max_over_mean(row: list[int]) -> float:
    total = sum(row)
    return max(row) * len(row) / total if total else 0.0


def balancedness(loads: Sequence[Sequence[float]]) -> list[float | None]:
    """loads [layer][unit] (unit: an EP rank, or an expert) -> [layer] mean/max over the units.

    1.0 is perfect balance; 1/units means one unit did everything. The reduction runs over
    the units *within* each layer: a layer whose ranks are uneven reads < 1.0 even when every
    layer is uneven the same way (reducing over layers instead, as vLLM once did, reads such a
    constant imbalance as 1.0). A layer with no load has no balance to speak of: None.
    """
    out: list[float | None] = []
    for row in loads:
        top = max(row) if len(row) else 0
        out.append(sum(row) / len(row) / top if top > 0 else None)
    return out


def aggregate_layers(values: Sequence[float | None]) -> dict[str, float | None]:
    """Per-layer figures -> {"min", "p50", "p90", "avg"} over the layers that have one (None
    where no layer has). Percentiles interpolate linearly between the sorted layer values."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return {"min": None, "p50": None, "p90": None, "avg": None}
    return {"min": xs[0], "p50": _percentile(xs, 0.5), "p90": _percentile(xs, 0.9), "avg": sum(xs) / len(xs)}


def _percentile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


class ExpertLoadCounters:
    """Device-side counters: expert_tokens[L, E], tokens[L], ranks_touched[L] (int64), and
    with EPLB (`num_slots` = E + redundant) physical_tokens[L, num_slots]."""

    def __init__(self, num_layers: int, num_experts: int, ep_size: int = 1, device: torch.device | str = "cpu",
                 num_slots: int | None = None) -> None:
        if num_experts % ep_size:
            raise ValueError(f"ep_size={ep_size} must divide num_experts={num_experts}")
        if num_slots is not None and num_slots % ep_size:
            raise ValueError(f"ep_size={ep_size} must divide the {num_slots} physical expert slots")
        self.num_layers, self.num_experts, self.ep_size = num_layers, num_experts, ep_size
        self.experts_per_rank = num_experts // ep_size
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.expert_tokens = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=self.device)
        self.tokens = torch.zeros(num_layers, dtype=torch.int64, device=self.device)
        self.ranks_touched = torch.zeros(num_layers, dtype=torch.int64, device=self.device)
        self.physical_tokens = (None if num_slots is None else
                                torch.zeros(num_layers, num_slots, dtype=torch.int64, device=self.device))
        self._flushed = torch.zeros_like(self.expert_tokens)  # expert counts from before the last reset

    def record(self, layer: int, topk_ids: torch.Tensor, valid: torch.Tensor | None = None,
               physical_ids: torch.Tensor | None = None) -> None:
        """Count one layer's routed ids [N, k]; `valid` [N] bool masks padding rows (graphs);
        `physical_ids` [N, k]: the slots EPLB sent them to (then ranks come from slots)."""
        n, k = topk_ids.shape
        ids = topk_ids.long()  # [N, k]
        weight = torch.ones_like(ids) if valid is None else valid.long()[:, None].expand(n, k)  # [N, k]
        self.expert_tokens[layer].index_add_(0, ids.reshape(-1), weight.reshape(-1))
        if physical_ids is None:
            owner = ids // self.experts_per_rank  # [N, k] rank holding each chosen expert
        else:
            slots = physical_ids.long()  # [N, k]
            self.physical_tokens[layer].index_add_(0, slots.reshape(-1), weight.reshape(-1))
            owner = slots // (self.num_slots // self.ep_size)  # [N, k]
        touched = torch.zeros(n, self.ep_size, dtype=torch.int64, device=ids.device)  # [N, ep]
        touched.scatter_(1, owner, 1)
        per_token = touched.sum(1)  # [N]
        if valid is None:
            self.ranks_touched[layer] += per_token.sum()
            self.tokens[layer] += n
        else:
            self.ranks_touched[layer] += (per_token * valid).sum()
            self.tokens[layer] += valid.sum()

    def reset(self) -> None:
        self._flushed += self.expert_tokens
        self.expert_tokens.zero_()
        self.tokens.zero_()
        self.ranks_touched.zero_()
        if self.physical_tokens is not None:
            self.physical_tokens.zero_()

    def lifetime_expert_tokens(self) -> torch.Tensor:
        """[L, E] this rank's logical counts since start-up, resets ignored (EPLB's window)."""
        return self._flushed + self.expert_tokens

    def snapshot(self, group: dist.ProcessGroup | None = None, reset: bool = False) -> ExpertLoadSnapshot:
        """Sum over the EP group (a collective: every rank must call it) and copy to the host."""
        parts = [self.expert_tokens.reshape(-1), self.tokens, self.ranks_touched]
        if self.physical_tokens is not None:
            parts.append(self.physical_tokens.reshape(-1))
        packed = torch.cat(parts)
        if group is not None and dist.get_world_size(group) > 1:
            packed = packed.clone()
            dist.all_reduce(packed, group=group)
        if reset:
            self.reset()
        flat = packed.cpu().tolist()
        L, E = self.num_layers, self.num_experts
        physical = None
        if self.num_slots is not None:
            base, P = L * E + 2 * L, self.num_slots
            physical = [flat[base + l * P:base + (l + 1) * P] for l in range(L)]
        return ExpertLoadSnapshot(
            expert_tokens=[flat[l * E:(l + 1) * E] for l in range(L)],
            tokens=flat[L * E:L * E + L],
            ranks_touched=flat[L * E + L:L * E + 2 * L],
            ep_size=self.ep_size,
            physical_tokens=physical,
        )
