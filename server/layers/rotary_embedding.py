"""Rotary position embedding, computed the way transformers does (float32 angles, then cast).

The tables are built once per forward step here; each attention layer applies them with the
`rope` kernel op its model chose (server/kernels/norm_rope.py: one Triton pass on CUDA).

Only rope types whose inverse frequencies do not depend on the sequence length are here;
anything else is refused when the config is read (server/model/families/base.py), never
approximated.
"""
from __future__ import annotations

from typing import Callable

import torch


def _default_inv_freq(head_dim: int, theta: float, factor: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))  # [D/2]


def _linear_inv_freq(head_dim: int, theta: float, factor: float) -> torch.Tensor:
    return _default_inv_freq(head_dim, theta, factor) / factor


#: rope_type -> inverse frequencies (head_dim, theta, factor) -> [head_dim / 2] float32
ROPE_TYPES: dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "default": _default_inv_freq,
    "linear": _linear_inv_freq,
}


class RotaryEmbedding:
    """cos/sin tables for given positions; inv_freq lives on the model's device."""

    def __init__(self, head_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                 device: torch.device | str = "cpu") -> None:
        self.inv_freq = ROPE_TYPES[rope_type](head_dim, theta, factor).to(device)  # [D/2] float32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int -> cos, sin [T, D] in `dtype`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)
