"""Triton MoE pipelines: fused_moe over router slots, grouped_expert_mlp over dispatched rows.

fused_moe (ep_size = 1, or every slot local):
  align (moe_align_block_size) -> gate_up_silu (gather rows t = slot // k) -> down_scatter
  (routing weight on the accumulator, rows written at their slot) -> combine_slots (sum of k).
grouped_expert_mlp (EP path; rows arrive grouped by local expert after the all-to-all):
  align_from_offsets -> gate_up_silu (rows as they are) -> down_scatter (no weight; the
  combine after the return all-to-all applies it).
expert_mlp_rows (EP path, rows in any order with a local expert id each): the fused_moe
  alignment with k = 1 groups them, and down_scatter writes each result back at its own row,
  so the caller needs no argsort and no permutation copies.

Launch count per call: 3-5 kernels, no host sync, shapes of every buffer fixed by the input
shapes: safe under CUDA-graph capture.
"""
from __future__ import annotations

import torch

from .moe_align import align_from_offsets, moe_align_block_size
from .moe_config import MoEConfig, get_moe_config
from .moe_gemm import combine_slots, down_scatter, gate_up_silu
from .moe_reference import check_expert_weights, check_offsets, check_routing
from ...kernels.workspace import workspace


def _check_dtypes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"activations and expert weights must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fused MoE supports bfloat16, float16 and float32, got {x.dtype}")


def _check_out(out: torch.Tensor, like: torch.Tensor) -> None:
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(like.shape)} {like.dtype} tensor on {like.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device} (contiguous={out.is_contiguous()})")


def fused_moe_triton(
    hidden: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_ids: torch.Tensor,  # [T, k] local ids; outside [0, E) (e.g. -1) = skip
    topk_weights: torch.Tensor,  # [T, k]
    config: MoEConfig | None = None,
    out: torch.Tensor | None = None,  # [T, H] contiguous, to write into
) -> torch.Tensor:  # [T, H]
    check_routing(hidden, topk_ids, topk_weights)
    num_experts, inter = check_expert_weights(w13, w2, hidden.shape[1])
    _check_dtypes(hidden, w13, w2)
    num_tokens, top_k = topk_ids.shape
    if hidden.stride(1) != 1:  # rows may be strided (a packed EP buffer): the kernel takes a row stride
        hidden = hidden.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    cfg = config or get_moe_config(num_experts, hidden.shape[1], inter, num_tokens * top_k, hidden.dtype, hidden.device)
    if out is not None:
        _check_out(out, hidden)
    if num_tokens == 0:
        return torch.empty_like(hidden) if out is None else out
    al = moe_align_block_size(topk_ids, num_experts, cfg.BLOCK_M)
    act = gate_up_silu(hidden, w13, al, cfg.gate_up, row_div=top_k)  # [max_padded, I]
    slots = workspace((num_tokens * top_k, hidden.shape[1]), hidden.dtype, hidden.device)  # [T*k, H]
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [T*k]
    down_scatter(act, w2, al, cfg.down, slots, weights)
    return combine_slots(slots, topk_ids, num_experts, out)  # [T, H]


def grouped_expert_mlp_triton(
    x_sorted: torch.Tensor,  # [M, H] rows grouped by local expert
    expert_offsets: torch.Tensor,  # [E+1] int, expert e owns rows offsets[e]:offsets[e+1]
    w13: torch.Tensor,
    w2: torch.Tensor,
    config: MoEConfig | None = None,
    out: torch.Tensor | None = None,  # [M, H] to write into (e.g. a preallocated EP buffer)
) -> torch.Tensor:  # [M, H]; rows outside [offsets[0], offsets[E]) are not written
    num_experts, inter = check_expert_weights(w13, w2, x_sorted.shape[1])
    check_offsets(x_sorted, expert_offsets, num_experts)
    _check_dtypes(x_sorted, w13, w2)
    num_rows, hidden = x_sorted.shape
    x_sorted = x_sorted.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    if out is None:
        out = workspace(tuple(x_sorted.shape), x_sorted.dtype, x_sorted.device)
    _check_out(out, x_sorted)
    if num_rows == 0:
        return out
    cfg = config or get_moe_config(num_experts, hidden, inter, num_rows, x_sorted.dtype, x_sorted.device)
    al = align_from_offsets(expert_offsets, num_rows, cfg.BLOCK_M)
    act = gate_up_silu(x_sorted, w13, al, cfg.gate_up, row_div=1)
    return down_scatter(act, w2, al, cfg.down, out)


def expert_mlp_rows_triton(
    x: torch.Tensor,  # [R, H] dispatched rows, any order
    local_ids: torch.Tensor,  # [R] local expert of each row; outside [0, E) = row not computed
    w13: torch.Tensor,
    w2: torch.Tensor,
    config: MoEConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [R, H]; rows with an id outside [0, E) are not written
    num_experts, inter = check_expert_weights(w13, w2, x.shape[1])
    _check_dtypes(x, w13, w2)
    if local_ids.dim() != 1 or local_ids.shape[0] != x.shape[0]:
        raise ValueError(f"local_ids must be [R={x.shape[0]}], got {tuple(local_ids.shape)}")
    num_rows, hidden = x.shape
    if x.stride(1) != 1:  # strided rows (a packed EP buffer) are read in place
        x = x.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    if out is None:
        out = workspace(tuple(x.shape), x.dtype, x.device)
    _check_out(out, x)
    if num_rows == 0:
        return out
    cfg = config or get_moe_config(num_experts, hidden, inter, num_rows, x.dtype, x.device)
    al = moe_align_block_size(local_ids[:, None], num_experts, cfg.BLOCK_M)  # slot id == row id (k = 1)
    act = gate_up_silu(x, w13, al, cfg.gate_up, row_div=1)
    return down_scatter(act, w2, al, cfg.down, out)
