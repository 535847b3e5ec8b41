"""Front door for the MoE ops, registered in the kernel-op table (server/kernels/ops.py):

    fused_moe(hidden [T,H], w13 [E,2I,H], w2 [E,H,I], topk_ids [T,k], topk_weights [T,k]) -> [T,H]
    grouped_expert_mlp(x_sorted [M,H], expert_offsets [E+1], w13, w2) -> [M,H]
    expert_mlp_rows(x [R,H], local_ids [R], w13, w2) -> [R,H]   (EP rows in any order)

Backends as for every op ("auto" | "triton" | "torch"); the MoE ops also accept "grouped_mm"
(torch._grouped_mm, CUDA sm90 / recent CPU builds).
"""
from __future__ import annotations

import torch

from ...kernels.ops import implementation, register_op

__all__ = ["expert_mlp_rows", "fused_moe", "grouped_expert_mlp", "implementation"]

register_op("fused_moe",
            triton="server.moe.kernels.fused_moe:fused_moe_triton",
            torch="server.moe.kernels.moe_reference:moe_reference",
            grouped_mm="server.moe.kernels.moe_reference:moe_grouped_mm")
register_op("grouped_expert_mlp",
            triton="server.moe.kernels.fused_moe:grouped_expert_mlp_triton",
            torch="server.moe.kernels.moe_reference:grouped_expert_mlp_reference",
            grouped_mm="server.moe.kernels.moe_reference:grouped_expert_mlp_grouped_mm")
register_op("expert_mlp_rows",
            triton="server.moe.kernels.fused_moe:expert_mlp_rows_triton",
            torch="server.moe.kernels.moe_reference:expert_mlp_rows_reference")


def fused_moe(hidden, w13, w2, topk_ids, topk_weights, *, backend: str = "auto") -> torch.Tensor:
    """[T, H]: sum over each token's valid slots (local id >= 0) of weight * expert MLP."""
    return implementation("fused_moe", backend, hidden)(hidden, w13, w2, topk_ids, topk_weights)


def grouped_expert_mlp(x_sorted, expert_offsets, w13, w2, *, backend: str = "auto") -> torch.Tensor:
    """[M, H]: expert e's MLP on rows offsets[e]:offsets[e+1] (EP path, no routing weight)."""
    return implementation("grouped_expert_mlp", backend, x_sorted)(x_sorted, expert_offsets, w13, w2)


def expert_mlp_rows(x, local_ids, w13, w2, *, backend: str = "auto") -> torch.Tensor:
    """[R, H]: row r through local expert local_ids[r]; rows may come in any order (no argsort needed)."""
    return implementation("expert_mlp_rows", backend, x)(x, local_ids, w13, w2)
