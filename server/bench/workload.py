"""The static workload: B sequences of L random prompt tokens, each generating O tokens.

Every sequence owns W = ceil((L+O)/block_size) KV blocks for the whole run (sequence i: blocks
i*W..i*W+W-1), so no allocation happens while timing. Everything a decode step needs that does
not depend on the sampled tokens (positions, slots) is precomputed on the device, so a step
costs a few views on the host. `token_offset` is this rank's first global token index (the
routing context's offset; ranks hold consecutive sequences).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.forward_batch import ForwardBatch


@dataclass
class StaticWorkload:
    prompts: torch.Tensor  # [B, L] int64 on the device
    output_len: int
    block_size: int
    block_tables: torch.Tensor  # [B, W] int32
    first_seq: int = 0  # global index of this rank's first sequence

    @classmethod
    def build(cls, *, batch: int, input_len: int, output_len: int, vocab_size: int, block_size: int,
              device: torch.device | str, seed: int = 0, first_seq: int = 0, total_batch: int | None = None,
              first_block: int = 0) -> "StaticWorkload":
        """Prompts are drawn for all `total_batch` sequences from one seed and this rank takes its
        slice, so the global workload is the same whatever the EP size."""
        total = total_batch or batch
        gen = torch.Generator().manual_seed(seed)
        prompts = torch.randint(0, vocab_size, (total, input_len), generator=gen)[first_seq:first_seq + batch]
        width = -(-(input_len + output_len) // block_size)
        tables = first_block + torch.arange(batch * width, dtype=torch.int32).view(batch, width)  # [B, W]
        return cls(prompts.to(device), output_len, block_size, tables.to(device), first_seq)

    @property
    def batch(self) -> int:
        return self.prompts.shape[0]

    @property
    def input_len(self) -> int:
        return self.prompts.shape[1]

    @property
    def num_blocks(self) -> int:
        return int(self.block_tables.numel())

    @property
    def device(self) -> torch.device:
        return self.prompts.device

    def _slots(self, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """positions/rows [n] -> [n] int64 cache slots."""
        blocks = self.block_tables[rows, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size

    def prefill_batch(self) -> ForwardBatch:
        b, l = self.prompts.shape
        dev = self.device
        positions = torch.arange(l, device=dev).repeat(b)  # [B*L]
        rows = torch.arange(b, device=dev).repeat_interleave(l)  # [B*L]
        return ForwardBatch(
            input_ids=self.prompts.reshape(-1), positions=positions, query_lens=[l] * b, context_lens=[l] * b,
            block_tables=self.block_tables, slot_mapping=self._slots(positions, rows),
            logits_indices=torch.arange(b, device=dev) * l + (l - 1), token_offset=self.first_seq * l)

    def decode_batches(self) -> "DecodeSteps":
        return DecodeSteps(self)


class DecodeSteps:
    """Decode step i (0-based) feeds token i+1 of each sequence at position L+i."""

    def __init__(self, work: StaticWorkload) -> None:
        b, l = work.prompts.shape
        dev = work.device
        steps = work.output_len - 1
        self.work = work
        self.positions = (l + torch.arange(steps, device=dev))[:, None].expand(steps, b).contiguous()  # [O-1, B]
        rows = torch.arange(b, device=dev)[None, :].expand(steps, b)
        self.slots = work._slots(self.positions.reshape(-1), rows.reshape(-1)).view(steps, b)  # [O-1, B]
        self.logits_indices = torch.arange(b, device=dev)
        self.query_lens = [1] * b

    def __len__(self) -> int:
        return self.positions.shape[0]

    def batch(self, step: int, tokens: torch.Tensor) -> ForwardBatch:
        """tokens [B] int64 on the device: the previous step's samples."""
        ctx = self.work.input_len + step + 1
        return ForwardBatch(
            input_ids=tokens, positions=self.positions[step], query_lens=self.query_lens,
            context_lens=[ctx] * self.work.batch, block_tables=self.work.block_tables,
            slot_mapping=self.slots[step], logits_indices=self.logits_indices, token_offset=self.work.first_seq)
