"""Repetition, presence and frequency penalties: per-slot token counts kept on the device.

Why counts live on the device: a decode step's input token is the one its slot sampled last
step, which the host may not know yet (overlapped steps). So every step adds its own *input*
tokens to the counts of their slots before sampling: a token at a position below the
sequence's prompt length marks the prompt set, one at or past it counts as generated. Each
position is an input exactly once (a preempted sequence refills its slot, which clears its
row, and recomputes its tokens as a longer prompt whose generated part lands in the generated
counts again), so the counts at sampling time are exactly the tokens before the one drawn.

Semantics (vLLM's, and OpenAI's for presence / frequency):
  * repetition_penalty p over prompt and generated tokens (transformers'
    RepetitionPenaltyLogitsProcessor): logit / p where the logit is > 0, logit * p otherwise;
  * then logit -= frequency * count + presence * (count > 0), over generated tokens only.

No host sync and no shape that depends on data: the record is one scatter over the step's
[T] tokens, the penalty a gather of [R, V] rows. The [Smax, V] state is allocated on the
first request that asks for a penalty, so servers whose users never do pay nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PenaltyParams:
    """One step's penalty inputs, per sampling row (device views of the step buffers)."""

    slots: torch.Tensor  # [R] int64 slot of each sampling row
    repetition: torch.Tensor  # [R] float32, 1 = off
    presence: torch.Tensor  # [R] float32, 0 = off
    frequency: torch.Tensor  # [R] float32, 0 = off


class PenaltyState:
    """Per-slot seen tokens of one rank: prompt set and generated counts, [Smax, V] each."""

    def __init__(self, max_seqs: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.generated = torch.zeros(max_seqs, vocab_size, dtype=torch.int32, device=device)  # [Smax, V]
        # int32 counts too (not bool): scatter-accumulate is defined for it on every device
        self.in_prompt = torch.zeros(max_seqs, vocab_size, dtype=torch.int32, device=device)  # [Smax, V]

    def clear(self, slots: torch.Tensor) -> None:
        """Slots taken by newly admitted sequences start with nothing seen. slots [A] int64."""
        self.generated.index_fill_(0, slots, 0)
        self.in_prompt.index_fill_(0, slots, 0)

    def copy_prompt(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Slots dst [A] start with the prompt set of slots src [A] (n > 1: a sequence that shares
        its parent's prompt blocks never runs those prompt tokens itself)."""
        self.in_prompt.index_copy_(0, dst, self.in_prompt.index_select(0, src))

    def record(self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
               seq_slots: torch.Tensor, prompt_lens: torch.Tensor) -> None:
        """Add one step's input tokens to their slots' rows.

        input_ids / positions [T] int64; cu_seqlens [S+1] int32 token offsets of the step's
        sequences; seq_slots / prompt_lens [S] int64 of those sequences."""
        t = input_ids.shape[0]
        row = torch.arange(t, device=input_ids.device)  # [T]
        seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64), row, right=True)  # [T] sequence of each token
        slot = seq_slots.index_select(0, seq)  # [T]
        generated = positions >= prompt_lens.index_select(0, seq)  # [T] bool
        # count each token in its set (accumulate handles repeats within the step)
        counted = generated.to(torch.int32)  # [T]
        self.in_prompt.index_put_((slot, input_ids), 1 - counted, accumulate=True)
        self.generated.index_put_((slot, input_ids), counted, accumulate=True)

    def apply(self, logits: torch.Tensor, params: PenaltyParams) -> torch.Tensor:
        """logits [R, V] float32 -> penalized copy [R, V]."""
        counts = self.generated.index_select(0, params.slots)  # [R, V] int32
        seen_out = counts > 0  # [R, V]
        seen = seen_out | (self.in_prompt.index_select(0, params.slots) > 0)  # [R, V]
        rep = params.repetition[:, None]  # [R, 1]
        scaled = torch.where(logits > 0, logits / rep, logits * rep)
        out = torch.where(seen, scaled, logits)
        out = out - params.frequency[:, None] * counts.to(logits.dtype) - params.presence[:, None] * seen_out.to(logits.dtype)
        return out
