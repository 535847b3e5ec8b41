"""Block-wise FP8 arithmetic in torch, apart from any file or kernel: the weights' 128x128 blocks
(weight_scale_inv) and the activations' per-row 128-channel groups.

One scale covers a b0 x b1 block of a weight; the last block row and column are partial when
the weight's sizes are not multiples of the block (DeepSeek-V3's kv_a_proj_with_mqa is
[576, 7168]: 4.5 block rows), and their scale still sits at the next index. Leading dims (a fused [E, rows, cols]
expert tensor and its [E, ceil(rows/b0), ceil(cols/b1)] scales) pass through unchanged.
"""
from __future__ import annotations

import math

import torch

GROUP = 128  # activation channels per scale == the weights' K block
E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
MIN_AMAX = 1e-10  # an all-zero group gets a tiny scale instead of a division by zero


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


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] -> (codes [M, K] e4m3, scales [M, ceil(K/128)] fp32), per row and
    128-channel group: scale = max|x| / 448, codes rounded to nearest even. The torch twin of
    every FP8 activation quantisation here (moe/kernels/fp8_quant.py's kernel, the dense
    linear's in-GEMM one, the FP8 dispatch rows); their codes match it bit for bit."""
    num_rows, k = x.shape
    groups = -(-k // GROUP)
    padded = torch.zeros(num_rows, groups * GROUP, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.to(torch.float32)
    g = padded.view(num_rows, groups, GROUP)  # [M, G, 128]
    scale = g.abs().amax(dim=2).clamp_min(MIN_AMAX) / E4M3_MAX  # [M, G]
    y = (g / scale[:, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    q = y.to(torch.float8_e4m3fn).view(num_rows, groups * GROUP)[:, :k]
    return q.contiguous(), scale


def dequantize_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(q [M, K] e4m3, s [M, ceil(K/128)]) -> fp32 [M, K] = q * s of each element's group."""
    k = q.shape[1]
    return q.to(torch.float32) * s.repeat_interleave(GROUP, dim=1)[:, :k]
