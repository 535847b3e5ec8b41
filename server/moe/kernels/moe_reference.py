"""Torch twins of the fused-MoE kernels: the CPU path, the oracle in tests, and baselines.

Expert weights follow the Hugging Face per-expert layout stacked over this rank's experts:
  w13 [E, 2I, H]: rows 0..I-1 = gate_proj.weight, rows I..2I-1 = up_proj.weight
  w2  [E, H, I]:  down_proj.weight
An expert maps x [n, H] -> down(silu(gate(x)) * up(x)) [n, H].

`moe_reference` loops over experts (one host sync to learn the group sizes) and keeps the
activation dtype between the two matmuls, as the Triton path does; fed float64 inputs it is
the high-precision oracle. `moe_grouped_mm` is torch's best fused alternative
(torch._grouped_mm, no host sync), used as a baseline on the GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_expert_weights(w13: torch.Tensor, w2: torch.Tensor, hidden_size: int) -> tuple[int, int]:
    """Validate stacked expert weights; returns (num_experts, intermediate_size)."""
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 and w2 must be 3-D [E, 2I, H] / [E, H, I], got {tuple(w13.shape)} / {tuple(w2.shape)}")
    num_experts, two_i, h13 = w13.shape
    if two_i % 2:
        raise ValueError(f"w13 dim 1 must be 2*intermediate (gate rows then up rows), got {two_i}")
    inter = two_i // 2
    if h13 != hidden_size or tuple(w2.shape) != (num_experts, hidden_size, inter):
        raise ValueError(
            f"weight shapes disagree with hidden size {hidden_size}: w13 {tuple(w13.shape)} "
            f"(want [E, 2I, H]), w2 {tuple(w2.shape)} (want [E, H, I] = [{num_experts}, {hidden_size}, {inter}])"
        )
    return num_experts, inter


def check_routing(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"topk_ids must be [T, k] with T={hidden.shape[0]}, got {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights shape {tuple(topk_weights.shape)} != topk_ids shape {tuple(topk_ids.shape)}")


def expert_mlp(x: torch.Tensor, w13_e: torch.Tensor, w2_e: torch.Tensor) -> torch.Tensor:
    """One expert: x [n, H], w13_e [2I, H], w2_e [H, I] -> [n, H] in x's dtype."""
    inter = w2_e.shape[1]
    gate_up = x @ w13_e.t()  # [n, 2I]
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
    return act @ w2_e.t()  # [n, H]


def moe_reference(
    hidden: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_ids: torch.Tensor,  # [T, k] local expert ids, -1 = not on this rank
    topk_weights: torch.Tensor,  # [T, k]
) -> torch.Tensor:  # [T, H]
    """sum_j w[t, j] * expert_{ids[t, j]}(x[t]) over each token's valid slots (ids >= 0)."""
    check_routing(hidden, topk_ids, topk_weights)
    num_experts, _ = check_expert_weights(w13, w2, hidden.shape[1])
    num_tokens, top_k = topk_ids.shape
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=acc_dtype, device=hidden.device)  # [T, H]
    if num_tokens == 0:
        return out.to(hidden.dtype)
    flat_ids = topk_ids.reshape(-1).long()  # [T*k]
    if bool(((flat_ids < -1) | (flat_ids >= num_experts)).any()):
        bad = flat_ids[(flat_ids < -1) | (flat_ids >= num_experts)][:4].tolist()
        raise ValueError(f"topk_ids must be local expert ids in [0, {num_experts}) or -1, got e.g. {bad}")
    order = torch.argsort(torch.where(flat_ids < 0, num_experts, flat_ids), stable=True)  # [T*k]
    counts = torch.bincount(flat_ids[flat_ids >= 0], minlength=num_experts).tolist()  # one host sync
    tokens_sorted = order // top_k  # [T*k] token index of each sorted slot
    weights_sorted = topk_weights.reshape(-1)[order].to(acc_dtype)  # [T*k]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = tokens_sorted[start : start + n]  # [n]
        y = expert_mlp(hidden[tok], w13[e], w2[e])  # [n, H]
        out.index_add_(0, tok, y.to(acc_dtype) * weights_sorted[start : start + n, None])
        start += n
    return out.to(hidden.dtype)


def check_offsets(x_sorted: torch.Tensor, expert_offsets: torch.Tensor, num_experts: int) -> None:
    if expert_offsets.dim() != 1 or expert_offsets.numel() != num_experts + 1:
        raise ValueError(f"expert_offsets must be [E_local+1] = [{num_experts + 1}], got {tuple(expert_offsets.shape)}")
    if expert_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_offsets must be int32 or int64, got {expert_offsets.dtype}")
    if x_sorted.dim() != 2:
        raise ValueError(f"x_sorted must be [M, H], got shape {tuple(x_sorted.shape)}")


def grouped_expert_mlp_reference(
    x_sorted: torch.Tensor,  # [M, H] rows grouped by local expert
    expert_offsets: torch.Tensor,  # [E+1]: expert e owns rows offsets[e]:offsets[e+1]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
) -> torch.Tensor:  # [M, H]; rows outside [offsets[0], offsets[E]) are zero
    """The EP path's expert step on dispatched rows, no routing weight (combine applies it)."""
    num_experts, _ = check_expert_weights(w13, w2, x_sorted.shape[1])
    check_offsets(x_sorted, expert_offsets, num_experts)
    offs = expert_offsets.tolist()  # one host sync
    if offs[0] < 0 or offs[-1] > x_sorted.shape[0] or any(a > b for a, b in zip(offs, offs[1:])):
        raise ValueError(f"expert_offsets must be non-decreasing within [0, {x_sorted.shape[0]}], got {offs}")
    out = torch.zeros_like(x_sorted)  # [M, H]
    for e in range(num_experts):
        if offs[e + 1] > offs[e]:
            out[offs[e] : offs[e + 1]] = expert_mlp(x_sorted[offs[e] : offs[e + 1]], w13[e], w2[e])
    return out


def expert_mlp_rows_reference(x: torch.Tensor, local_ids: torch.Tensor, w13: torch.Tensor,
                              w2: torch.Tensor) -> torch.Tensor:
    """x [R, H], local_ids [R] -> [R, H]: row r through expert local_ids[r] (EP path, no weight)."""
    num_experts, _ = check_expert_weights(w13, w2, x.shape[1])
    if local_ids.dim() != 1 or local_ids.shape[0] != x.shape[0]:
        raise ValueError(f"local_ids must be [R={x.shape[0]}], got {tuple(local_ids.shape)}")
    ids = local_ids.long()
    if bool(((ids < 0) | (ids >= num_experts)).any()):
        raise ValueError(f"local_ids must lie in [0, {num_experts}), got e.g. {ids[(ids < 0) | (ids >= num_experts)][:4].tolist()}")
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():  # one host sync
        rows = (ids == e).nonzero(as_tuple=True)[0]
        out[rows] = expert_mlp(x[rows], w13[e], w2[e])
    return out


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


def grouped_expert_mlp_grouped_mm(
    x_sorted: torch.Tensor, expert_offsets: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """torch._grouped_mm twin of grouped_expert_mlp (offsets[0] must be 0; no host sync).

    Rows past offsets[E] come back unspecified (grouped_mm leaves them untouched).
    """
    num_experts, inter = check_expert_weights(w13, w2, x_sorted.shape[1])
    check_offsets(x_sorted, expert_offsets, num_experts)
    ends = expert_offsets[1:].to(torch.int32)  # [E] cumulative row ends
    gate_up = _grouped_mm(x_sorted, w13.transpose(1, 2), ends)  # [M, 2I]
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [M, I]
    return _grouped_mm(act, w2.transpose(1, 2), ends)  # [M, H]


def moe_grouped_mm(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Same function as moe_reference via sort + torch._grouped_mm + weighted sum (no host sync)."""
    check_routing(hidden, topk_ids, topk_weights)
    num_experts, _ = check_expert_weights(w13, w2, hidden.shape[1])
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1).long()  # [N = T*k]
    valid = flat_ids >= 0  # [N]
    key = torch.where(valid, flat_ids, num_experts)  # invalid slots sort last
    order = torch.argsort(key, stable=True)  # [N]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=hidden.device)
    counts.index_add_(0, key, torch.ones_like(key))  # [E+1], no sync (bincount would sync on CUDA)
    offsets = torch.cat([counts.new_zeros(1), counts[:num_experts].cumsum(0)])  # [E+1]
    x_sorted = hidden[order // top_k]  # [N, H]
    y_sorted = grouped_expert_mlp_grouped_mm(x_sorted, offsets, w13, w2)  # [N, H]
    y_slots = torch.empty_like(y_sorted)
    y_slots[order] = y_sorted  # [N, H] back in slot order
    w = torch.where(valid, topk_weights.reshape(-1).float(), 0.0)  # [N]
    y = torch.where(valid[:, None], y_slots.float(), 0.0) * w[:, None]  # NaN-safe for unwritten rows
    return y.view(num_tokens, top_k, -1).sum(1).to(hidden.dtype)  # [T, H]
