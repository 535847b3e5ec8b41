"""Paged KV-cache bookkeeping for one EP rank (the block ids, not the tensors).

Rank 0 keeps one BlockManager per rank: the scheduler decides which blocks every rank's
sequences use, and ships the block tables in the step plan. The cache tensors themselves
live on each rank (model.allocate_kv_cache), `num_blocks` x `block_size` token slots.

Blocks are reference-counted: the sequences of one request with n > 1 share the full blocks
of their prompt (`share`), and a block returns to the free list when its last holder frees it.
Shared blocks are full, so nobody writes into them after sharing.
"""
from __future__ import annotations

from collections import deque


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs: dict[int, int] = {}  # block in use -> sequences holding it

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks; raises if there are fewer (callers check can_allocate first)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        """One more sequence holds these blocks (in use already)."""
        for b in blocks:
            if b not in self._refs:
                raise RuntimeError(f"KV block {b} shared but not in use")
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """The caller no longer holds these blocks; those nobody holds become free."""
        for b in blocks:
            refs = self._refs.get(b)
            if refs is None:
                raise RuntimeError(f"KV block {b} freed twice or never allocated")
            if refs > 1:
                self._refs[b] = refs - 1
            else:
                del self._refs[b]
                self._free.append(b)
