"""RMSNorm as transformers computes it, through the rms_norm kernel op chosen at build."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.backend import KernelBackend


class RMSNorm(nn.Module):
    """transformers' RMSNorm: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None, device=None,
                 kernels: KernelBackend | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device))
        self.eps = eps
        # torch on CPU, one Triton pass on CUDA (kernels: the model's choice; None: by `device`)
        self.rms_norm = (kernels or KernelBackend.for_device(device)).op("rms_norm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        return self.rms_norm(x, self.weight, self.eps)
