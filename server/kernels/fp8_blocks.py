"""Block-wise FP8 dequantisation: the arithmetic of weight_scale_inv, apart from any file.

One scale covers a b0 x b1 block of a weight; the last block row and column are partial when
the weight's sizes are not multiples of the block (DeepSeek-V3's kv_a_proj_with_mqa is
[576, 7168]: 4.5 block rows), and their scale still sits at the next index. Leading dims (a fused [E, rows, cols]
expert tensor and its [E, ceil(rows/b0), ceil(cols/b1)] scales) pass through unchanged.
"""
from __future__ import annotations

import math

import torch


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """[..., rows, cols] -> [..., ceil(rows/b0), ceil(cols/b1)]: the scales a weight needs."""
    *lead, rows, cols = weight_shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def implied_block(weight_shape: tuple[int, ...], scales: tuple[int, ...]) -> tuple[int, int] | None:
    """The block size whose scale grid over `weight_shape` is `scales`, if one exists: how an
    error can say "these scales were written with [64, 64] blocks" instead of only "wrong shape"."""
    if len(scales) != len(weight_shape) or scales[:-2] != weight_shape[:-2] or min(scales[-2:], default=0) < 1:
        return None
    guess = (math.ceil(weight_shape[-2] / scales[-2]), math.ceil(weight_shape[-1] / scales[-1]))
    return guess if scale_shape(weight_shape, guess) == tuple(scales) else None


def dequantize_blocks(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """codes [..., rows, cols] float8_e4m3fn, scale_inv [..., ceil(rows/b0), ceil(cols/b1)]
    -> float32 [..., rows, cols] = codes * scale of the block each element is in.

    float32 throughout: an e4m3 code times a float32 scale is one rounding, so the serving dtype
    sees the value the checkpoint's authors meant (casting the scale to bf16 first would not)."""
    rows, cols = codes.shape[-2:]
    scale = scale_inv.to(torch.float32)
    scale = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]  # [..., rows, ceil(cols/b1)]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]  # [..., rows, cols]
    return codes.to(torch.float32) * scale
