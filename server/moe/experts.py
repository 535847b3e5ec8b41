"""The routed experts one EP rank owns, stored fused: gate_up_proj [E_local, 2I, H] (gate rows
first, then up: transformers' in-memory layout) and down_proj [E_local, H, I].

The torch path groups rows by expert and runs one pair of matmuls per expert that has rows;
a grouped-GEMM kernel (server/moe/kernels/) can replace `forward` with the same contract.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import activation


class LocalExperts(nn.Module):
    def __init__(self, num_local: int, hidden: int, intermediate: int, act: str, first_expert: int = 0,
                 dtype=None, device=None) -> None:
        super().__init__()
        self.num_local, self.hidden, self.intermediate = num_local, hidden, intermediate
        self.first_expert = first_expert  # global id of local expert 0
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * intermediate, hidden, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden, intermediate, dtype=dtype, device=device))
        self.act = activation(act)

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.gate_up_proj, self.down_proj))

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x [R, H], local_ids [R] int in [0, E_local) -> [R, H]: row r through expert local_ids[r]."""
        if x.shape[0] == 0:
            return torch.empty_like(x)
        order = torch.argsort(local_ids, stable=True)  # [R] rows grouped by expert
        counts = torch.bincount(local_ids, minlength=self.num_local).tolist()  # host sync: CPU/eager path
        xs = x[order]  # [R, H]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = xs[start:start + n]  # [n, H]
            gate, up = F.linear(seg, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
            out[start:start + n] = F.linear(self.act(gate) * up, self.down_proj[e])  # [n, H]
            start += n
        result = torch.empty_like(x)
        result[order] = out
        return result
