"""What one engine step asks of the model on one EP rank (the engine <-> model contract).

The engine's scheduler builds one ForwardBatch per rank per step: this rank's sequences only
(attention is data-parallel), prefill and decode may be mixed. Every rank calls the model in
every step, even with zero tokens, because each MoE layer runs all-to-all collectives.

KV cache layout, per layer: k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads,
head_dim]; a sequence's context lives in the blocks listed in its row of `block_tables`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64: new tokens of every sequence, concatenated
    positions: torch.Tensor  # [T] int64: position of each new token in its sequence
    query_lens: list[int]  # [S] new tokens per sequence (prefill: prompt chunk; decode: 1)
    context_lens: list[int]  # [S] tokens in the KV cache after this step (cached + new)
    block_tables: torch.Tensor  # [S, max_blocks] int32, KV block ids per sequence, -1 pads
    slot_mapping: torch.Tensor  # [T] int64: block * block_size + offset where each new token's K/V goes
    logits_indices: torch.Tensor  # [R] int64: rows of T whose logits are returned (each sampling sequence's last token)
    token_offset: int = 0  # this rank's first global token index in the step (RoutingContext)
    # The same lengths already on the device (the engine uploads them with the step's other inputs,
    # so attention metadata needs no copy of its own); None: built from the lists when needed.
    context_lens_dev: torch.Tensor | None = None  # [S] int32
    cu_seqlens_dev: torch.Tensor | None = None  # [S+1] int32 prefix sums of query_lens
    #: rows every EP rank's MoE layers pad to in this step (the scheduler's max over ranks, or
    #: the decode bucket); None: the dispatcher agrees on it with the other ranks itself
    ep_rows: int | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> "ForwardBatch":
        """An idle rank's batch: no sequences, but it still joins every collective."""
        z = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(z, z, [], [], torch.zeros(0, 1, dtype=torch.int32, device=device), z, z)
