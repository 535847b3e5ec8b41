"""The expert path of experts stored as e4m3 codes with 128x128 block scales (weight format
"fp8", server/model/expert_format.py): the block-FP8 MoE kernels, with the dispatcher-facing
methods of KernelExpertPath (server/moe/experts.py).

experts.gate_up_proj [E_local, 2I, H] / experts.down_proj [E_local, H, I] hold the codes,
experts.gate_up_proj_scale_inv [E_local, 2I/128, ceil(H/128)] / experts.down_proj_scale_inv
[E_local, ceil(H/128), I/128] the fp32 scales. Nothing here syncs with the host (EP rows are
grouped with index_add_ counts as on the bf16 path, or run unsorted), so CUDA graphs capture it.
"""
from __future__ import annotations

import torch

from ..kernels.backend import KernelBackend


class Fp8ExpertPath:
    compiles = True
    #: partial_topk_quantized reads rows already quantised as its own first step would (the FP8
    #: EP wire's codes and scales, dispatch/fp8_rows.py), skipping a dequantise and a requantise
    takes_quantized_rows = True

    def __init__(self, kernels: KernelBackend) -> None:
        from .kernels import fused_moe_fp8  # imports triton: built only where the FP8 kernels run

        self.name = f"{kernels.expert_path}_fp8"
        self.rows_grouped = kernels.expert_path != "triton_unsorted"
        self._fused = fused_moe_fp8.fused_moe_fp8_triton
        self._grouped = fused_moe_fp8.grouped_expert_mlp_fp8_triton
        self._unsorted = fused_moe_fp8.expert_mlp_rows_fp8_triton

    @staticmethod
    def _weights(experts) -> tuple[torch.Tensor, ...]:
        return experts.gate_up_proj, experts.gate_up_proj_scale_inv, experts.down_proj, experts.down_proj_scale_inv

    def topk_variant(self, experts, num_tokens: int, top_k: int):
        """The compiled variant `local_topk` on num_tokens tokens uses: FP8 config, align constexprs."""
        from .kernels.fp8_config import get_fp8_moe_config
        from .kernels.moe_align import align_variant

        rows = num_tokens * top_k
        cfg = get_fp8_moe_config(experts.num_local, experts.hidden, experts.intermediate, rows, experts.gate_up_proj.device)
        return cfg, align_variant(rows, cfg.BLOCK_M)

    def rows_variant(self, experts, num_rows: int):
        from .kernels.fp8_config import get_fp8_moe_config
        from .kernels.moe_align import align_variant

        cfg = get_fp8_moe_config(experts.num_local, experts.hidden, experts.intermediate, num_rows,
                                 experts.gate_up_proj.device)
        return (cfg,) if self.rows_grouped else (cfg, align_variant(num_rows, cfg.BLOCK_M))

    def local_topk(self, experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], ids [N, k] global ids (all on this rank), weights [N, k] -> [N, H]."""
        local = ids if experts.first_expert == 0 else ids - experts.first_expert
        return self._fused(x, *self._weights(experts), local, weights)

    def partial_topk(self, experts, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], local_ids [T, k] (-1: another rank's slot, skipped) -> [T, H]."""
        return self._fused(x, *self._weights(experts), local_ids, weights)

    def partial_topk_quantized(self, experts, codes: torch.Tensor, scales: torch.Tensor, local_ids: torch.Tensor,
                               weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """codes [T, H] e4m3 + scales [T, H/128] fp32 (rows may be strided), local_ids [T, k]
        (-1: another rank's slot) -> [T, H] dtype."""
        return self._fused(codes, *self._weights(experts), local_ids, weights, hidden_scales=scales, out_dtype=dtype)

    def rows(self, experts, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x [R, H], local_ids [R] -> [R, H], no routing weight (the EP combine applies it)."""
        if x.shape[0] == 0:
            return torch.empty_like(x)
        if not self.rows_grouped:
            return self._unsorted(x, local_ids, *self._weights(experts))
        ids = local_ids.long()  # [R]
        order = torch.argsort(ids, stable=True)  # [R] rows grouped by local expert
        counts = torch.zeros(experts.num_local, dtype=torch.int64, device=x.device)
        counts.index_add_(0, ids, torch.ones_like(ids))  # [E_local]; bincount would sync on CUDA
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [E_local + 1]
        out_sorted = self._grouped(x[order], offsets, *self._weights(experts))  # [R, H]
        out = torch.empty_like(x)
        out[order] = out_sorted
        return out
