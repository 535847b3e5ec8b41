"""Rotary position embedding, computed the way transformers does (float32 angles, then cast).

The tables are built once per forward step here; each attention layer applies them with the
`rope` kernel op its model chose (server/kernels/norm_rope.py: one Triton pass on CUDA).

Only rope types whose inverse frequencies do not depend on the sequence length are here;
anything else is refused when the config is read (server/model/families/base.py), never
approximated. YaRN also scales cos/sin by an attention factor (transformers' `attention_scaling`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE parameters (transformers' `rope_parameters` with rope_type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # None: derived from factor / mscale / mscale_all_dim
    truncate: bool = True


#: (inverse frequencies [head_dim / 2] float32, factor applied to cos and sin)
RopeTables = tuple[torch.Tensor, float]


def _default_inv_freq(head_dim: int, theta: float, factor: float, yarn: YarnScaling | None) -> RopeTables:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0  # [D/2]


def _linear_inv_freq(head_dim: int, theta: float, factor: float, yarn: YarnScaling | None) -> RopeTables:
    inv_freq, _ = _default_inv_freq(head_dim, theta, factor, yarn)
    return inv_freq / factor, 1.0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction for a context stretched `scale` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(head_dim: int, theta: float, factor: float, yarn: YarnScaling | None) -> RopeTables:
    """transformers' _compute_yarn_parameters: interpolated frequencies for the slow dims,
    original ones for the fast dims, a linear ramp between (beta_fast / beta_slow rotations)."""
    if yarn is None:
        raise ValueError("rope_type 'yarn' needs its YarnScaling parameters")
    factor = yarn.factor
    attention = yarn.attention_factor
    if attention is None:
        if yarn.mscale and yarn.mscale_all_dim:
            attention = float(yarn_mscale(factor, yarn.mscale) / yarn_mscale(factor, yarn.mscale_all_dim))
        else:
            attention = yarn_mscale(factor)
    original = yarn.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # [D/2]
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: original frequency (extrapolate), 0: interpolated
    return interpolation * (1 - keep) + extrapolation * keep, attention


#: rope_type -> (head_dim, theta, linear factor, yarn parameters) -> (inv_freq [head_dim / 2], cos/sin factor)
ROPE_TYPES: dict[str, Callable[[int, float, float, YarnScaling | None], RopeTables]] = {
    "default": _default_inv_freq,
    "linear": _linear_inv_freq,
    "yarn": _yarn_inv_freq,
}


class RotaryEmbedding:
    """cos/sin tables for given positions; inv_freq lives on the model's device."""

    def __init__(self, head_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                 device: torch.device | str = "cpu", yarn: YarnScaling | None = None) -> None:
        inv_freq, self.attention_scaling = ROPE_TYPES[rope_type](head_dim, theta, factor, yarn)
        self.inv_freq = inv_freq.to(device)  # [D/2] float32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int -> cos, sin [T, D] in `dtype`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., D] pairs (x0, x1), (x2, x3), ... -> [x0, x2, ..., x1, x3, ...]. RoPE on interleaved
    dims (DeepSeek's rope_interleave) is rotate-half RoPE on this permutation; transformers'
    apply_rotary_pos_emb_interleave returns the same permuted layout, which the cache keeps."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
