"""One exchange per direction: a token's hidden row, its k expert ids and its k routing
weights packed into one byte row, so a single collective carries all three.

Row layout (bytes, padded to a multiple of 16 so every field stays aligned):

    [ hidden: H * sizeof(dtype) | ids: k * int32 | weights: k * float32 | pad ]

The receiver reads the fields as strided views of the received buffer: no unpack copy. An id
of -1 marks a pair that nobody computes (a padding row, or a slot another rank owns).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN = 16  # bytes: keeps int32/float32 fields and vectorised row loads aligned


class PackedRow:
    """What every packed row layout shares: `hidden_bytes` of hidden state, then k int32 ids and
    k float32 weights, padded to ALIGN (this layout's, and fp8_rows.Fp8TokenRows')."""

    hidden_bytes: int
    top_k: int

    @property
    def row_bytes(self) -> int:
        raw = self.hidden_bytes + 8 * self.top_k  # int32 ids + float32 weights
        return -(-raw // ALIGN) * ALIGN

    def empty(self, rows: int, device: torch.device) -> torch.Tensor:
        """[rows, row_bytes] uint8, uninitialised."""
        return torch.empty(rows, self.row_bytes, dtype=torch.uint8, device=device)


@dataclass(frozen=True)
class TokenRows(PackedRow):
    """The byte layout of one packed row for hidden size H, activation dtype and top-k."""

    hidden: int
    dtype: torch.dtype
    top_k: int

    @property
    def hidden_bytes(self) -> int:
        return self.hidden * self.dtype.itemsize

    def fields(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """buf [R, row_bytes] uint8 -> views hidden [R, H] dtype, ids [R, k] int32, weights [R, k] float32."""
        h, k = self.hidden_bytes, self.top_k
        hidden = buf[:, :h].view(self.dtype)  # [R, H], row stride row_bytes / itemsize
        ids = buf[:, h:h + 4 * k].view(torch.int32)  # [R, k]
        weights = buf[:, h + 4 * k:h + 8 * k].view(torch.float32)  # [R, k]
        return hidden, ids, weights

    def pack(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rows: int,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, H], ids/weights [N, k], N <= rows -> [rows, row_bytes] uint8.

        Rows N..rows-1 (padding to the common row count) and rows with valid[i] False get id -1
        in every slot: nobody computes them, whatever their hidden bytes hold."""
        n = x.shape[0]
        if n > rows:
            raise ValueError(f"{n} rows do not fit a packed buffer of {rows}")
        buf = self.empty(rows, x.device)
        hidden_v, ids_v, weights_v = self.fields(buf)
        hidden_v[:n].copy_(x)
        write_send_ids(ids_v, ids, valid)
        weights_v[:n].copy_(weights)
        weights_v[n:].zero_()
        return buf

    def unpack(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the receiver's experts read: `fields` (the hidden rows travel as they are)."""
        return self.fields(buf)

    def expert_rows(self, buf: torch.Tensor, takes_quantized: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`unpack`: these rows carry no quantised form to take (fp8_rows.Fp8TokenRows does)."""
        return self.unpack(buf)


def write_send_ids(out: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The ids a rank sends, written into out [R, k] int32 (R >= N): ids [N, k] of its real
    rows, -1 in every slot of a padding row (valid[i] False, or i >= N). Nobody computes a
    slot of -1. Shared by `TokenRows.pack` and the EP what-if, which lays out the same rows."""
    n = ids.shape[0]
    if valid is None:
        out[:n].copy_(ids)
    else:
        out[:n].copy_(torch.where(valid[:, None], ids.to(torch.int32), -1))
    out[n:].fill_(-1)
    return out


def local_slots(ids: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """ids [R, k] global expert (or slot) ids -> [R, k] int32 ids within [first, first+count)
    relative to `first`, and -1 for every id outside it (another rank's expert, or -1)."""
    local = ids - first  # [R, k] int32
    return torch.where((local >= 0) & (local < count), local, -1).to(torch.int32)
