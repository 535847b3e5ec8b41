"""A linear layer that keeps an FP8 block checkpoint's weight as stored: e4m3 codes plus one fp32
scale per 128x128 block, half the bytes of bf16 (server/kernels/fp8_linear.py says why that
matters in decode and how the GEMM runs).

Which kernel runs is fixed when the layer is built: the Triton W8A8 kernel (activations
quantised inside the GEMM), or its fp32 torch twin, which computes the same quantised product
(CPU tests; a GPU run never takes it unless asked). The bias, where a checkpoint has one, stays
in the serving dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.fp8_linear import fp8_linear_reference, fp8_linear_triton


class Fp8Linear(nn.Module):
    def __init__(self, codes: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None, use_kernel: bool) -> None:
        """codes [out, in] float8_e4m3fn, scale_inv [ceil(out/128), ceil(in/128)], bias [out] or None."""
        super().__init__()
        if codes.dtype != torch.float8_e4m3fn or codes.dim() != 2:
            raise ValueError(f"Fp8Linear takes 2-D float8_e4m3fn codes, got {codes.dtype} {list(codes.shape)}")
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight_codes", codes.contiguous())
        self.register_buffer("weight_scale_inv", scale_inv.to(torch.float32).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.use_kernel = use_kernel

    @property
    def num_bytes(self) -> int:
        return self.weight_codes.numel() + self.weight_scale_inv.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if self.use_kernel:
            return fp8_linear_triton(x, self.weight_codes, self.weight_scale_inv, self.bias)
        return fp8_linear_reference(x, self.weight_codes, self.weight_scale_inv, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 128x128 blocks, " \
               f"{'triton' if self.use_kernel else 'torch twin'}"
