"""What the fixed-capacity dispatch's all-gather carries per token (parallel.dispatch_wire).

  bf16  the hidden row as it is, in the activation dtype (bf16 for a served model; an fp32
        model's rows travel as fp32): token_rows.TokenRows
  fp8   e4m3 codes plus one float32 scale per 128 channels: fp8_rows.Fp8TokenRows, about
        half the bytes of a bf16 row

Only the gather leg changes. The combine leg returns partial sums in the activation dtype on
either wire: each token's ep partials are added on its source rank, so their rounding adds up
across ranks, and the full-precision sum is what the next layer reads.
"""
from __future__ import annotations

import torch

from .fp8_rows import Fp8TokenRows
from .token_rows import TokenRows

WIRES = ("bf16", "fp8")
RowLayout = TokenRows | Fp8TokenRows


def row_layout(wire: str, hidden: int, dtype: torch.dtype, top_k: int) -> RowLayout:
    """The packed row of `wire` for hidden size H, activation dtype and top-k."""
    if wire == "bf16":
        return TokenRows(hidden, dtype, top_k)
    if wire == "fp8":
        return Fp8TokenRows(hidden, dtype, top_k)
    raise ValueError(f"unknown dispatch wire {wire!r}; one of {WIRES}")


def wire_row_bytes(wire: str, hidden: int, top_k: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one token's row takes on the all-gather, ids, weights and alignment included:
    bf16 ceil16(2H + 8k), fp8 ceil16(H + 4H/128 + 8k) (`dtype`: the activation dtype, which
    only the bf16 wire sends as is). The all-gather moves ep * R rows of it to every rank."""
    return row_layout(wire, hidden, dtype, top_k).row_bytes
