"""Logical -> physical expert ids on the device, inside the forward.

For token i (global index t = token_offset + i) routed to logical expert e, the replica used
is replicas[e][t % count[e]]: consecutive tokens of a step take a hot expert's copies in
turn, so its load splits evenly over them, and the choice depends only on (t, e) — the same
on every rank and every run. Tables are preallocated at the widest possible replica count
(1 + R: one expert cannot have more copies), so a rebalance rewrites them in place and a
CUDA graph captured once keeps reading the current placement; no host sync per call.
"""
from __future__ import annotations

import torch

from .placement import ExpertPlacement


class ReplicaMap:
    def __init__(self, placement: ExpertPlacement, device: torch.device | str = "cpu") -> None:
        self.num_layers, self.num_experts = placement.num_layers, placement.num_experts
        self.num_slots, self.ep_size = placement.num_slots, placement.ep_size
        self.width = placement.redundant + 1
        self.device = torch.device(device)
        self.table = torch.zeros(self.num_layers, self.num_experts, self.width, dtype=torch.int64, device=self.device)  # [L, E, 1+R]
        self.counts = torch.ones(self.num_layers, self.num_experts, dtype=torch.int64, device=self.device)  # [L, E]
        self.update(placement)

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.ep_size

    def update(self, placement: ExpertPlacement) -> None:
        """Load a new placement of the same shape into the existing tensors (in place)."""
        if (placement.num_layers, placement.num_experts, placement.num_slots, placement.ep_size) != (
                self.num_layers, self.num_experts, self.num_slots, self.ep_size):
            raise ValueError("a rebalance cannot change the number of layers, experts, slots or ranks")
        replicas = [placement.replicas(layer) for layer in range(self.num_layers)]  # [L][E] -> slots
        table = [[slots + [0] * (self.width - len(slots)) for slots in row] for row in replicas]  # padding never read
        counts = [[len(slots) for slots in row] for row in replicas]
        self.table.copy_(torch.tensor(table, dtype=torch.int64))
        self.counts.copy_(torch.tensor(counts, dtype=torch.int64))

    def __call__(self, layer: int, ids: torch.Tensor, token_offset: int | torch.Tensor = 0) -> torch.Tensor:
        """ids [N, k] logical -> [N, k] int32 physical slots."""
        n = ids.shape[0]
        logical = ids.long()  # [N, k]
        token = torch.arange(n, device=ids.device, dtype=torch.int64) + token_offset  # [N] global token index
        replica = token[:, None] % self.counts[layer][logical]  # [N, k]
        return self.table[layer][logical, replica].to(torch.int32)  # [N, k]
