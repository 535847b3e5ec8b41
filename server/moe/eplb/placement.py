"""ExpertPlacement: which logical expert each physical expert slot holds, per MoE layer.

With R redundant experts a layer has P = E + R physical slots, P / ep_size per rank; slot q
lives on rank q // (P / ep_size) at local index q % (P / ep_size). Routing policies work on
logical ids; the replica map (replica_map.py) turns them into physical slots. The block
layout (slot e holds expert e, no copies) is what epserve does without EPLB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .algorithm import place_layer


def max_over_mean(values: Sequence[float]) -> float:
    total = sum(values)
    return max(values) * len(values) / total if total else 0.0


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int  # logical experts E
    ep_size: int
    slots: tuple[tuple[int, ...], ...]  # [layer][physical slot] -> logical expert

    def __post_init__(self) -> None:
        for layer, row in enumerate(self.slots):
            if len(row) != self.num_slots:
                raise ValueError(f"layer {layer}: {len(row)} slots, expected {self.num_slots} like layer 0")
            if len(row) % self.ep_size:
                raise ValueError(f"{len(row)} physical slots do not split evenly over ep_size={self.ep_size}")
            bad = [e for e in row if not 0 <= e < self.num_experts]
            if bad:
                raise ValueError(f"layer {layer}: slot experts {bad[:4]} outside [0, {self.num_experts})")
            missing = sorted(set(range(self.num_experts)) - set(row))
            if missing:
                raise ValueError(f"layer {layer}: logical experts {missing[:8]} have no physical slot")

    # ---- construction ----
    @classmethod
    def block(cls, num_layers: int, num_experts: int, ep_size: int) -> "ExpertPlacement":
        """Slot e holds expert e: rank r owns experts [r*E/ep, (r+1)*E/ep), no copies."""
        return cls(num_experts, ep_size, tuple(tuple(range(num_experts)) for _ in range(num_layers)))

    @classmethod
    def balanced(cls, loads: Sequence[Sequence[float]], *, num_experts: int, redundant: int, ep_size: int,
                 policy: str = "auto", num_groups: int = 1, num_nodes: int = 1) -> "ExpertPlacement":
        """Replicate-then-pack every layer from its loads [layer][E] (algorithm.py)."""
        num_slots = num_experts + redundant
        rows = []
        for layer, row in enumerate(loads):
            if len(row) != num_experts:
                raise ValueError(f"layer {layer}: {len(row)} expert loads, expected {num_experts}")
            rows.append(tuple(place_layer(row, num_slots, ep_size, policy, num_groups, num_nodes)))
        return cls(num_experts, ep_size, tuple(rows))

    # ---- shape ----
    @property
    def num_layers(self) -> int:
        return len(self.slots)

    @property
    def num_slots(self) -> int:
        return len(self.slots[0]) if self.slots else self.num_experts

    @property
    def redundant(self) -> int:
        return self.num_slots - self.num_experts

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep_size

    # ---- queries ----
    def local_experts(self, layer: int, rank: int) -> tuple[int, ...]:
        """Logical expert held by each of `rank`'s slots in `layer`."""
        s = self.slots_per_rank
        return self.slots[layer][rank * s:(rank + 1) * s]

    def replicas(self, layer: int) -> list[list[int]]:
        """[E] -> the physical slots holding that expert, ascending (the replica order)."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, e in enumerate(self.slots[layer]):
            out[e].append(slot)
        return out

    def replica_counts(self, layer: int) -> list[int]:
        return [len(r) for r in self.replicas(layer)]

    def max_replicas(self) -> int:
        return max((max(self.replica_counts(l)) for l in range(self.num_layers)), default=1)

    def rank_loads(self, layer: int, loads: Sequence[float]) -> list[float]:
        """Expected load [ep] of each rank if each expert's load splits evenly over its copies."""
        counts = self.replica_counts(layer)
        s = self.slots_per_rank
        row = self.slots[layer]
        return [sum(loads[e] / counts[e] for e in row[r * s:(r + 1) * s]) for r in range(self.ep_size)]

    def rank_max_over_mean(self, loads: Sequence[Sequence[float]]) -> list[float]:
        """[layer] expected per-rank max/mean of `loads` [layer][E] under this placement."""
        return [max_over_mean(self.rank_loads(l, row)) for l, row in enumerate(loads)]

    def with_layer(self, layer: int, row: Sequence[int]) -> "ExpertPlacement":
        rows = list(self.slots)
        rows[layer] = tuple(row)
        return ExpertPlacement(self.num_experts, self.ep_size, tuple(rows))

    # ---- plain data (logs, files) ----
    def to_dict(self) -> dict:
        return {"num_experts": self.num_experts, "ep_size": self.ep_size, "slots": [list(r) for r in self.slots]}

    @classmethod
    def from_dict(cls, data: dict) -> "ExpertPlacement":
        return cls(int(data["num_experts"]), int(data["ep_size"]), tuple(tuple(int(e) for e in r) for r in data["slots"]))
