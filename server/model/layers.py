"""Small building blocks shared by every family: RMSNorm, activations, the dense gated MLP."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.kernels import ops
from .spec import ModelLoadError

#: config.json `hidden_act` -> function (the names transformers' ACT2FN uses)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = ACTIVATIONS.get(name)
    if fn is None:
        raise ModelLoadError(f"hidden_act {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return fn


class RMSNorm(nn.Module):
    """transformers' RMSNorm: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        return ops.rms_norm(x, self.weight, self.eps)  # torch on CPU, one Triton pass on CUDA


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): dense layers and Qwen2-MoE's shared expert."""

    def __init__(self, hidden: int, intermediate: int, act: str, dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, H]
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
