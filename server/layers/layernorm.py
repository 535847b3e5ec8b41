"""RMSNorm as transformers computes it, through the rms_norm kernel op."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import ops


class RMSNorm(nn.Module):
    """transformers' RMSNorm: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        return ops.rms_norm(x, self.weight, self.eps)  # torch on CPU, one Triton pass on CUDA
