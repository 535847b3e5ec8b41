"""A minimal engine stand-in for model tests: owns one rank's paged KV cache, hands out
blocks (deliberately out of order, so paging bugs show), and turns per-sequence work into a
ForwardBatch. The real scheduler lives in server/engine/."""
from __future__ import annotations

import random

import torch

from server.model.forward_batch import ForwardBatch


class PagedDriver:
    def __init__(self, model, num_blocks: int = 64, block_size: int = 4, seed: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.kv = model.allocate_kv_cache(num_blocks, block_size)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def build_batch(self, work: list[tuple[int, list[int]]], token_offset: int = 0) -> ForwardBatch:
        device = self.model.device
        if not work:
            return ForwardBatch.empty(device)
        ids, positions, slots, q_lens, ctx_lens, last = [], [], [], [], [], []
        for sid, tokens in work:
            start = self.lens.get(sid, 0)
            ctx = start + len(tokens)
            table = self.tables.setdefault(sid, [])
            while len(table) * self.block_size < ctx:
                table.append(self.free.pop())
            for pos in range(start, ctx):
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            ids += tokens
            positions += range(start, ctx)
            q_lens.append(len(tokens))
            ctx_lens.append(ctx)
            last.append(len(ids) - 1)
            self.lens[sid] = ctx
        width = max(len(self.tables[sid]) for sid, _ in work)
        tables = torch.full((len(work), width), -1, dtype=torch.int32)
        for row, (sid, _) in enumerate(work):
            tables[row, :len(self.tables[sid])] = torch.tensor(self.tables[sid], dtype=torch.int32)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        return ForwardBatch(as_long(ids), as_long(positions), q_lens, ctx_lens, tables.to(device),
                            as_long(slots), as_long(last), token_offset)

    def step(self, work: list[tuple[int, list[int]]], token_offset: int = 0) -> dict[int, torch.Tensor]:
        """Run one step; -> {seq_id: [V] float32 logits of its last new token} (cpu)."""
        logits = self.model(self.build_batch(work, token_offset), self.kv)
        return {sid: logits[i].cpu() for i, (sid, _) in enumerate(work)}
