"""Block-FP8 (W8A8) MoE pipelines: fused_moe_triton and friends for e4m3 expert weights.

Same stages, alignment, combine and launch rules as fused_moe.py (no host sync, buffer shapes
from input shapes only: CUDA-graph safe), with two quantisations added:
  quantise x per row / 128 channels -> align -> gate_up_silu_fp8 -> quantise act (live rows
  only, count read on the device) -> down_scatter_fp8 -> combine (fused_moe only).
Expert weights stay e4m3 [E, N, K] with the checkpoint's fp32 block scales [E, ceil(N/128),
ceil(K/128)], half the bytes of bf16. Activations in and out keep the serving dtype; the
SiLU*up product is rounded to it before its quantisation, as the bf16 pipeline rounds it.

The act quantisation is a separate launch: fusing it into the gate_up epilogue needs a whole
128-channel group per program (BLOCK_N = 128), which the tuned tiles do not all have.
"""
from __future__ import annotations

import torch

from ...kernels.workspace import workspace
from ...kernels.fp8_blocks import scale_shape
from .fp8_config import check_fp8_config, get_fp8_moe_config
from .fp8_quant import GROUP, quantize_rows_fp8
from .fused_moe import _check_out
from .moe_align import Alignment, align_from_offsets, moe_align_block_size
from .moe_config import MoEConfig
from .moe_gemm import combine_slots
from .moe_gemm_fp8 import down_scatter_fp8, gate_up_silu_fp8
from .moe_reference import check_expert_weights, check_offsets, check_routing

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_fp8_experts(x: torch.Tensor, w13: torch.Tensor, w13_s: torch.Tensor, w2: torch.Tensor,
                      w2_s: torch.Tensor) -> tuple[int, int]:
    """Shapes and dtypes of an FP8 expert set against activations x [*, H]: (E, I)."""
    num_experts, inter = check_expert_weights(w13, w2, x.shape[1])
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"FP8 MoE activations must be bfloat16, float16 or float32, got {x.dtype}")
    for name, w, s in (("w13", w13, w13_s), ("w2", w2, w2_s)):
        if w.dtype != torch.float8_e4m3fn or s.dtype != torch.float32:
            raise ValueError(f"{name} must be float8_e4m3fn with float32 scales, got {w.dtype} / {s.dtype}")
        want = scale_shape(tuple(w.shape), (GROUP, GROUP))
        if tuple(s.shape) != want:
            raise ValueError(f"{name} scales must be {want} (one per {GROUP}x{GROUP} block), got {tuple(s.shape)}")
    return num_experts, inter


def _expert_mlp_fp8(x, w13, w13_s, w2, w2_s, al: Alignment, cfg: MoEConfig, row_div: int, out: torch.Tensor,
                    weights: torch.Tensor | None = None, x_scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [*, H] rows (via al) -> out rows: both quantisations and both GEMMs. With x_scales
    [*, H/128], x already holds e4m3 codes quantised the same way and the first quantisation
    is skipped; the activations then take out's dtype."""
    inter = w13.shape[1] // 2
    if x_scales is None:
        xq, xs = quantize_rows_fp8(x)  # [*, H] e4m3, [*, ceil(H/128)]
    else:
        xq, xs = x, x_scales
    act = workspace((al.sorted_ids.numel(), inter), out.dtype, x.device)  # [max_padded, I]
    gate_up_silu_fp8(xq, xs, w13.contiguous(), w13_s.contiguous(), al, cfg.gate_up, row_div, act)
    aq, a_s = quantize_rows_fp8(act, al.num_padded)  # rows past num_padded are never read
    return down_scatter_fp8(aq, a_s, w2.contiguous(), w2_s.contiguous(), al, cfg.down, out, weights)


def _config(cfg: MoEConfig | None, num_experts: int, hidden: int, inter: int, rows: int, device) -> MoEConfig:
    return check_fp8_config(cfg) if cfg is not None else get_fp8_moe_config(num_experts, hidden, inter, rows, device)


def fused_moe_fp8_triton(
    hidden: torch.Tensor,  # [T, H]
    w13: torch.Tensor, w13_s: torch.Tensor,  # [E, 2I, H] e4m3, [E, ceil(2I/128), ceil(H/128)] fp32
    w2: torch.Tensor, w2_s: torch.Tensor,  # [E, H, I] e4m3, [E, ceil(H/128), ceil(I/128)] fp32
    topk_ids: torch.Tensor,  # [T, k] local ids; outside [0, E) = skip
    topk_weights: torch.Tensor,  # [T, k]
    config: MoEConfig | None = None,
    out: torch.Tensor | None = None,  # [T, H]
    hidden_scales: torch.Tensor | None = None,  # [T, H/128] fp32: hidden holds e4m3 codes already
    out_dtype: torch.dtype | None = None,  # with hidden_scales: the activation dtype of the result
) -> torch.Tensor:  # [T, H]
    """With hidden_scales, `hidden` is rows already quantised as fp8_quant.quantize_rows_fp8 does
    (e4m3 codes, one float32 scale per token and 128 channels; rows may be strided, e.g. views
    of the FP8 EP wire's buffer, dispatch/fp8_rows.py): the first quantisation is skipped."""
    act_like = hidden if hidden_scales is None else _check_quantized(hidden, hidden_scales, out_dtype)
    check_routing(act_like, topk_ids, topk_weights)
    num_experts, inter = check_fp8_experts(act_like, w13, w13_s, w2, w2_s)
    num_tokens, top_k = topk_ids.shape
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    cfg = _config(config, num_experts, hidden.shape[1], inter, num_tokens * top_k, hidden.device)
    if out is not None:
        _check_out(out, act_like)
    if num_tokens == 0:
        return torch.empty_like(act_like) if out is None else out
    al = moe_align_block_size(topk_ids, num_experts, cfg.BLOCK_M)
    slots = workspace((num_tokens * top_k, hidden.shape[1]), act_like.dtype, hidden.device)  # [T*k, H]
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [T*k]
    _expert_mlp_fp8(hidden, w13, w13_s, w2, w2_s, al, cfg, top_k, slots, weights, hidden_scales)
    return combine_slots(slots, topk_ids, num_experts, out)


def _check_quantized(codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    """Pre-quantised rows: e4m3 codes [T, H], scales [T, H/128] fp32 -> an empty [T, H] out_dtype
    tensor standing in for the activations in the shape and dtype checks."""
    if codes.dtype != torch.float8_e4m3fn or scales.dtype != torch.float32 or out_dtype is None:
        raise ValueError(f"quantised rows need e4m3 codes, float32 scales and an out_dtype, got {codes.dtype}, "
                         f"{scales.dtype}, {out_dtype}")
    want = (codes.shape[0], -(-codes.shape[1] // GROUP))
    if codes.dim() != 2 or tuple(scales.shape) != want or scales.stride(1) != 1:
        raise ValueError(f"scales must be {want} with unit inner stride for codes {tuple(codes.shape)}, "
                         f"got {tuple(scales.shape)}")
    return torch.empty(1, codes.shape[1], dtype=out_dtype, device=codes.device).expand(codes.shape[0], -1)


def grouped_expert_mlp_fp8_triton(
    x_sorted: torch.Tensor,  # [M, H] rows grouped by local expert
    expert_offsets: torch.Tensor,  # [E+1]
    w13: torch.Tensor, w13_s: torch.Tensor, w2: torch.Tensor, w2_s: torch.Tensor,
    config: MoEConfig | None = None,
    out: torch.Tensor | None = None,  # [M, H]
) -> torch.Tensor:  # [M, H]; rows outside [offsets[0], offsets[E]) are not written
    num_experts, inter = check_fp8_experts(x_sorted, w13, w13_s, w2, w2_s)
    check_offsets(x_sorted, expert_offsets, num_experts)
    num_rows, hidden = x_sorted.shape
    x_sorted = x_sorted.contiguous()
    if out is None:
        out = workspace(tuple(x_sorted.shape), x_sorted.dtype, x_sorted.device)
    _check_out(out, x_sorted)
    if num_rows == 0:
        return out
    cfg = _config(config, num_experts, hidden, inter, num_rows, x_sorted.device)
    al = align_from_offsets(expert_offsets, num_rows, cfg.BLOCK_M)
    return _expert_mlp_fp8(x_sorted, w13, w13_s, w2, w2_s, al, cfg, 1, out)


def expert_mlp_rows_fp8_triton(
    x: torch.Tensor,  # [R, H] dispatched rows, any order
    local_ids: torch.Tensor,  # [R]; outside [0, E) = row not computed
    w13: torch.Tensor, w13_s: torch.Tensor, w2: torch.Tensor, w2_s: torch.Tensor,
    config: MoEConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [R, H]; rows with an id outside [0, E) are not written
    num_experts, inter = check_fp8_experts(x, w13, w13_s, w2, w2_s)
    if local_ids.dim() != 1 or local_ids.shape[0] != x.shape[0]:
        raise ValueError(f"local_ids must be [R={x.shape[0]}], got {tuple(local_ids.shape)}")
    num_rows, hidden = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if out is None:
        out = workspace(tuple(x.shape), x.dtype, x.device)
    _check_out(out, x)
    if num_rows == 0:
        return out
    cfg = _config(config, num_experts, hidden, inter, num_rows, x.device)
    al = moe_align_block_size(local_ids[:, None], num_experts, cfg.BLOCK_M)  # slot id == row id (k = 1)
    return _expert_mlp_fp8(x, w13, w13_s, w2, w2_s, al, cfg, 1, out)
