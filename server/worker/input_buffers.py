"""One rank's persistent step inputs: pinned host staging, one device buffer, one copy per step.

Every batch input of a step — token ids, positions, slot mapping, block tables, logits
indices, attention lengths and sampling parameters (penalties and min_tokens included) — is a typed view at a fixed offset of
one byte buffer. The host fills numpy views of a pinned copy; a single host-to-device copy
of the used span moves the whole step; the model, the sampler and the decode CUDA graphs read
device views of the same sections (the graphs were captured against them, so nothing is
copied again before a replay). Capacities are the engine's limits: Smax = max_num_seqs rows,
Tmax = max_num_batched_tokens + max_num_seqs tokens, W block-table columns.

The buffer starts with `next_token` [Smax] (device only, never uploaded): the last token each
slot sampled. The uploaded `explicit` tokens follow it directly, so a step's input ids are
one gather from that contiguous pool — `pool[gather]`, where a row that decodes the token its
slot sampled last step points at the slot, and any other row at its explicit token.

Host staging is double-buffered on CUDA: the copy of step n+1 may still be queued behind step
n when step n+2 is built, so consecutive steps alternate pinned buffers, and an event recorded
after each copy guards reuse. On CPU host and device views are the same memory (no copy).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_SECTIONS = (  # name, dtype, rows: "S" = Smax, "T" = Tmax, "S1" = Smax + 1, "1", "SW" = [Smax, W]
    ("next_token", torch.int64, "S"),  # device-only state: not part of the upload
    ("explicit", torch.int64, "T"),
    ("gather", torch.int64, "T"),
    ("positions", torch.int64, "T"),
    ("slot_mapping", torch.int64, "T"),
    ("logits_indices", torch.int64, "S"),
    ("sample_slots", torch.int64, "S"),
    ("hot_rows", torch.int64, "S"),  # sample rows that draw (temperature > 0), when some are greedy
    ("top_k", torch.int64, "S"),
    ("keys", torch.int64, "S"),
    ("token_offset", torch.int64, "1"),
    ("context_lens", torch.int32, "S"),
    ("cu_seqlens", torch.int32, "S1"),
    ("temperature", torch.float32, "S"),
    ("top_p", torch.float32, "S"),
    ("min_p", torch.float32, "S"),  # hot rows' order, like temperature
    # penalties (penalties.py): per sampling row, and per sequence for recording input tokens
    ("repetition", torch.float32, "S"),
    ("presence", torch.float32, "S"),
    ("frequency", torch.float32, "S"),
    ("seq_slots", torch.int64, "S"),
    ("prompt_lens", torch.int64, "S"),
    ("ban_rows", torch.bool, "S"),  # sampling rows still under their min_tokens
    ("valid_rows", torch.bool, "S"),
    ("block_tables", torch.int32, "SW"),  # last: a step uploads only the rows it uses
)
_NP = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


@dataclass(frozen=True)
class Section:
    offset: int  # bytes
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()


def layout(max_seqs: int, max_tokens: int, width: int) -> tuple[dict[str, Section], int]:
    """Fixed offsets of every section (8-byte aligned) and the total size in bytes."""
    rows = {"S": (max_seqs,), "T": (max_tokens,), "S1": (max_seqs + 1,), "1": (1,), "SW": (max_seqs, width)}
    out, offset = {}, 0
    for name, dtype, kind in _SECTIONS:
        sec = Section(offset, dtype, rows[kind])
        out[name] = sec
        offset += -(-sec.nbytes // 8) * 8
    return out, offset


class StepInputs:
    """The staging buffers of one rank (see the module docstring)."""

    def __init__(self, *, max_seqs: int, max_tokens: int, width: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.max_seqs, self.max_tokens, self.width = max_seqs, max_tokens, width
        self.sections, self.nbytes = layout(max_seqs, max_tokens, width)
        self.upload_start = self.sections["explicit"].offset
        cuda = self.device.type == "cuda"
        self._dev_bytes = torch.zeros(self.nbytes, dtype=torch.uint8, device=self.device)
        if cuda:
            self._host_bytes = [torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        else:
            self._host_bytes = [self._dev_bytes]  # the same memory: nothing to copy
        self._copied = [None] * len(self._host_bytes)  # CUDA event after each buffer's last copy
        self._turn = 0
        #: device views, fixed for the life of the rank (the decode graphs capture them)
        self.dev = {name: self._view_t(self._dev_bytes, sec) for name, sec in self.sections.items()}
        self._host_np = [{name: self._view_np(buf.numpy(), sec) for name, sec in self.sections.items()}
                         for buf in self._host_bytes]
        #: pool[i]: slot i's last sampled token (i < Smax), then this step's explicit tokens
        self.pool = self._dev_bytes[:self.sections["explicit"].offset + self.sections["explicit"].nbytes].view(torch.int64)
        self.dev["next_token"].zero_()

    @staticmethod
    def _view_t(buf: torch.Tensor, sec: Section) -> torch.Tensor:
        return buf[sec.offset:sec.offset + sec.nbytes].view(sec.dtype).view(sec.shape)

    @staticmethod
    def _view_np(buf: np.ndarray, sec: Section) -> np.ndarray:
        return buf[sec.offset:sec.offset + sec.nbytes].view(_NP[sec.dtype]).reshape(sec.shape)

    @property
    def copies(self) -> bool:
        """True where host and device are different memory (CUDA)."""
        return self._host_bytes[0] is not self._dev_bytes

    def host(self) -> dict[str, np.ndarray]:
        """The numpy views to fill for the next step (waits, rarely, for that buffer's last copy)."""
        event = self._copied[self._turn]
        if event is not None and not event.query():
            event.synchronize()
        return self._host_np[self._turn]

    def upload(self, rows: int) -> None:
        """One host-to-device copy of everything the step filled: all sections up to the block
        tables, and `rows` rows of those. Then the other host buffer takes the next step."""
        if self.copies:
            end = self.sections["block_tables"].offset + rows * self.width * 4
            src = self._host_bytes[self._turn][self.upload_start:end]
            self._dev_bytes[self.upload_start:end].copy_(src, non_blocking=True)
            event = self._copied[self._turn] or torch.cuda.Event()
            event.record()
            self._copied[self._turn] = event
        self._turn = (self._turn + 1) % len(self._host_bytes)
