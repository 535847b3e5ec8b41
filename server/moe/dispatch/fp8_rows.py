"""The fixed-capacity dispatch's row with the hidden state as FP8: e4m3 codes plus one float32
scale per 128-channel group, in the same byte row as the token's ids and weights.

Row layout (bytes, padded to a multiple of 16; H a multiple of 128, G = H / 128):

    [ codes: H * e4m3 | scales: G * float32 | ids: k * int32 | weights: k * float32 | pad ]

About half the bytes of a bf16 row (H + H/32 against 2H, plus the same 8k of ids and weights).
The scheme is the block-FP8 expert path's activation quantisation (kernels/fp8_quant.py): per
token, per 128 channels, scale = max|x| / 448, code = e4m3(x / scale), rounded to nearest even.
So the codes and scales a rank receives are exactly what the FP8 expert GEMM would compute from
the same row: where the rank's experts are FP8 blocks (fp8_expert_path.Fp8ExpertPath), the GEMM
reads them straight off the buffer (`expert_rows` gives QuantizedRows), with no dequantise and
no requantise. Any other expert path gets the rows dequantised to the activation dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...kernels.availability import default_backend
from ...kernels.fp8_blocks import GROUP, quantize_rows_reference
from .token_rows import PackedRow, write_send_ids


def quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] (H % 128 == 0) -> (codes [N, H] float8_e4m3fn, scales [N, H/128] float32).

    On CUDA with Triton: the FP8 expert path's own quantiser (one launch, graph-safe). Elsewhere
    its torch twin (kernels/fp8_blocks.quantize_rows_reference); the codes match bit for bit."""
    if x.is_cuda and default_backend(x.device) == "triton":
        from ..kernels.fp8_quant import quantize_rows_fp8

        return quantize_rows_fp8(x.contiguous())
    return quantize_rows_reference(x)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [R, H] e4m3 (rows may be strided), scales [R, H/128] -> [R, H] dtype, a new tensor.
    Elementwise only: no host sync, fixed shapes."""
    g = codes.unflatten(1, (-1, GROUP)).to(torch.float32) * scales[:, :, None]  # [R, G, 128]
    return g.flatten(1).to(dtype)


@dataclass(frozen=True)
class QuantizedRows:
    """Gathered rows as e4m3 codes [T, H] and scales [T, H/128] (views of the wire buffer) for an
    expert path that reads them as they are; dtype is the activation dtype of its result. shape,
    dtype and device read like the dequantised rows' would (the what-if's stand-in experts size
    their zero output from them)."""

    codes: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device


@dataclass(frozen=True)
class Fp8TokenRows(PackedRow):
    """The byte layout of one FP8 row for hidden size H, activation dtype (what `unpack`
    returns) and top-k. Same interface as token_rows.TokenRows."""

    hidden: int
    dtype: torch.dtype
    top_k: int

    def __post_init__(self) -> None:
        if self.hidden % GROUP:
            raise ValueError(f"FP8 rows need a hidden size that is a multiple of {GROUP}, got {self.hidden}")

    @property
    def groups(self) -> int:
        return self.hidden // GROUP

    @property
    def hidden_bytes(self) -> int:
        return self.hidden + 4 * self.groups  # e4m3 codes + float32 scales

    def fields(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """buf [R, row_bytes] uint8 -> views codes [R, H] e4m3, scales [R, G] float32, ids [R, k]
        int32, weights [R, k] float32. H % 128 == 0 keeps the scales 4-byte aligned."""
        h, hb, k = self.hidden, self.hidden_bytes, self.top_k
        codes = buf[:, :h].view(torch.float8_e4m3fn)  # [R, H], row stride row_bytes
        scales = buf[:, h:hb].view(torch.float32)  # [R, G]
        ids = buf[:, hb:hb + 4 * k].view(torch.int32)  # [R, k]
        weights = buf[:, hb + 4 * k:hb + 8 * k].view(torch.float32)  # [R, k]
        return codes, scales, ids, weights

    def pack(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rows: int,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, H], ids/weights [N, k], N <= rows -> [rows, row_bytes] uint8.

        As TokenRows.pack: rows N..rows-1 and rows with valid[i] False carry id -1 in every slot.
        Rows N.. also get zero codes and scales, so their dequantised hidden state is zero,
        never a NaN read off uninitialised bytes (nobody computes them either way)."""
        n = x.shape[0]
        if n > rows:
            raise ValueError(f"{n} rows do not fit a packed buffer of {rows}")
        buf = self.empty(rows, x.device)
        codes_v, scales_v, ids_v, weights_v = self.fields(buf)
        codes, scales = quantize_groups(x)  # [N, H] e4m3, [N, G]
        codes_v[:n].copy_(codes)
        scales_v[:n].copy_(scales)
        buf[n:, :self.hidden_bytes].zero_()  # e4m3 code 0x00 is +0.0
        write_send_ids(ids_v, ids, valid)
        weights_v[:n].copy_(weights)
        weights_v[n:].zero_()
        return buf

    def unpack(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """buf [R, row_bytes] -> hidden [R, H] activation dtype (dequantised, a new tensor), ids
        and weights [R, k] (views)."""
        codes, scales, ids, weights = self.fields(buf)
        return dequantize_groups(codes, scales, self.dtype), ids, weights

    def expert_rows(self, buf: torch.Tensor, takes_quantized: bool):
        """buf [R, row_bytes] -> (hidden, ids [R, k], weights [R, k]): hidden as QuantizedRows
        (views, nothing computed) for an expert path that takes_quantized, else dequantised."""
        if not takes_quantized:
            return self.unpack(buf)
        codes, scales, ids, weights = self.fields(buf)
        return QuantizedRows(codes, scales, self.dtype), ids, weights
