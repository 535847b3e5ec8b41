"""Held-out perplexity through our own model (server/model), with a routing policy in every
MoE layer: teacher forcing, every position scored.

Each step takes `ep_size * seqs_per_rank` held-out windows; simulated rank r gets windows
[r * seqs_per_rank, (r + 1) * seqs_per_rank) and runs its own forward with its own global
token offset, exactly as DP attention + EP runs a step (each rank routes only its tokens).
"""
from __future__ import annotations

import torch

from ..model.causal_lm import MoECausalLM
from ..model.forward_batch import ForwardBatch
from .probe import PolicyProbe

BLOCK_SIZE = 16


def prefill_batch(windows: torch.Tensor, token_offset: int, block_size: int = BLOCK_SIZE) -> ForwardBatch:
    """[S, L] token ids -> one all-prefill ForwardBatch scoring every position (logits for all T)."""
    s, length = windows.shape
    blocks = -(-length // block_size)
    tables = torch.arange(s * blocks, dtype=torch.int32).view(s, blocks)  # [S, blocks]
    positions = torch.arange(length, dtype=torch.int64).repeat(s)  # [T]
    seq = torch.arange(s, dtype=torch.int64).repeat_interleave(length)  # [T]
    slots = tables.long()[seq, positions // block_size] * block_size + positions % block_size  # [T]
    return ForwardBatch(
        input_ids=windows.reshape(-1).long(), positions=positions, query_lens=[length] * s, context_lens=[length] * s,
        block_tables=tables, slot_mapping=slots, logits_indices=torch.arange(s * length, dtype=torch.int64),
        token_offset=token_offset,
    )


@torch.inference_mode()
def heldout_nll(model: MoECausalLM, probe: PolicyProbe, windows: torch.Tensor, ep_size: int, seqs_per_rank: int) -> tuple[float, int]:
    """windows [S, L+1] -> (summed next-token NLL in nats, scored tokens)."""
    per_step = ep_size * seqs_per_rank
    if windows.shape[0] % per_step:
        raise ValueError(f"{windows.shape[0]} windows do not split into steps of ep_size x seqs_per_rank = {per_step}")
    length = windows.shape[1] - 1
    kv = model.allocate_kv_cache(seqs_per_rank * -(-length // BLOCK_SIZE), BLOCK_SIZE)
    model.policy = probe
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], per_step):
        for rank in range(ep_size):
            w = windows[start + rank * seqs_per_rank:start + (rank + 1) * seqs_per_rank]  # [s, L+1]
            probe.sim_rank = rank
            logits = model(prefill_batch(w[:, :-1], token_offset=rank * seqs_per_rank * length), kv)  # [s*L, V]
            total += float(torch.nn.functional.cross_entropy(logits, w[:, 1:].reshape(-1), reduction="sum"))
            count += w[:, 1:].numel()
        probe.end_step()
    return total, count
