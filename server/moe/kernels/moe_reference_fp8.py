"""Torch twins of the block-FP8 MoE pipelines (fused_moe_fp8.py): the oracle of their tests.

The twin quantises exactly where the kernels do (x per row / 128 channels; the SiLU*up product
after rounding it to the activation dtype) with the same rule (fp8_quant.quantize_rows_reference),
dequantises weights and activations to fp32, and multiplies in fp32. What remains between
kernel and twin is fp32 summation order (and, rarely, an act element that this order moves
across an e4m3 rounding boundary), so the comparison can be tight instead of allowing the
whole FP8 quantisation error.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels.fp8_blocks import dequantize_blocks
from .fp8_quant import GROUP, dequantize_rows, quantize_rows_reference


def _qdq(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> fp32 [M, K]: quantised per row / 128 channels and dequantised again."""
    return dequantize_rows(*quantize_rows_reference(x))


def expert_rows_fp8_reference(
    x: torch.Tensor,  # [R, H]
    row_expert: torch.Tensor,  # [R] local expert per row; outside [0, E) = not computed
    w13: torch.Tensor, w13_s: torch.Tensor,  # [E, 2I, H] e4m3, block scales
    w2: torch.Tensor, w2_s: torch.Tensor,  # [E, H, I] e4m3, block scales
) -> torch.Tensor:  # [R, H] fp32; rows not computed are 0
    block = (GROUP, GROUP)
    w13_f, w2_f = dequantize_blocks(w13, w13_s, block), dequantize_blocks(w2, w2_s, block)  # fp32
    inter = w2.shape[2]
    xd = _qdq(x)  # [R, H]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        rows = (row_expert == e).nonzero().flatten()
        if rows.numel() == 0:
            continue
        h = xd[rows] @ w13_f[e].T  # [r, 2I]
        act = (F.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)  # rounded as the kernel stores it
        out[rows] = _qdq(act) @ w2_f[e].T
    return out


def fused_moe_fp8_reference(hidden, w13, w13_s, w2, w2_s, topk_ids: torch.Tensor,
                            topk_weights: torch.Tensor) -> torch.Tensor:
    """[T, H] fp32: sum over each token's valid slots of weight * FP8 expert MLP."""
    num_tokens, top_k = topk_ids.shape
    x = hidden.repeat_interleave(top_k, dim=0)  # [T*k, H]: slot t*k+j holds token t
    ids = topk_ids.reshape(-1).long()
    slots = expert_rows_fp8_reference(x, ids, w13, w13_s, w2, w2_s)  # [T*k, H]
    slots = slots * topk_weights.reshape(-1, 1).to(torch.float32)
    return slots.view(num_tokens, top_k, -1).sum(dim=1)


def grouped_expert_mlp_fp8_reference(x_sorted, expert_offsets: torch.Tensor, w13, w13_s, w2, w2_s) -> torch.Tensor:
    """[M, H] fp32: expert e on rows offsets[e]:offsets[e+1]; rows outside all runs are 0."""
    offsets = expert_offsets.tolist()
    row_expert = torch.full((x_sorted.shape[0],), -1, dtype=torch.long, device=x_sorted.device)
    for e in range(len(offsets) - 1):
        row_expert[offsets[e]:offsets[e + 1]] = e
    return expert_rows_fp8_reference(x_sorted, row_expert, w13, w13_s, w2, w2_s)


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (e4m3 [..., N, K], fp32 scale_inv [..., ceil(N/128), ceil(K/128)]):
    the checkpoint format, for tests and benchmarks that start from random float weights."""
    *lead, n, k = w.shape
    nb, kb = -(-n // GROUP), -(-k // GROUP)
    padded = torch.zeros(*lead, nb * GROUP, kb * GROUP, dtype=torch.float32, device=w.device)
    padded[..., :n, :k] = w.to(torch.float32)
    blocks = padded.view(*lead, nb, GROUP, kb, GROUP)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp_min(1e-10) / 448.0  # [..., nb, kb]
    q = (blocks / scale[..., :, None, :, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(*lead, nb * GROUP, kb * GROUP)[..., :n, :k].contiguous(), scale
