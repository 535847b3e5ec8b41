"""The sampling features beyond temperature / top-k / top-p, for one rank: penalties, min_p,
min_tokens, top-N logprobs and prompt logprobs.

Why one place: each feature has host staging (per-row values into the step buffers, decided
from the slot table with numpy), device state (penalty counts, the ids min_tokens holds back)
and a host-side flag that keeps the step on the plain path when no row asks. A step whose
requests use none of them stages nothing new and runs exactly the kernels it ran before.

On the device nothing here syncs with the host or takes a shape from data: per-row values are
fixed-size views of the step buffers, the top-N is a fixed K = min(MAX_TOP_LOGPROBS, V).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..engine.api import MAX_TOP_LOGPROBS
from .input_buffers import StepInputs
from .penalties import PenaltyParams, PenaltyState
from .slot_table import SlotTable
from .step_plan import MAX_BANNED_IDS, RankBatch, SlotFill


@dataclass(frozen=True)
class ExtraFlags:
    """Host-side switches of one step (from the slot table; no device sync)."""

    record: bool = False  # some sequence of the step has a penalty: count its input tokens
    penalize: bool = False  # some sampling row has a penalty
    min_p: bool = False  # some drawing row has min_p > 0
    ban: bool = False  # some sampling row is still under its min_tokens
    top: bool = False  # some sampling row wants top-N logprobs


NO_EXTRAS = ExtraFlags()


class SamplingExtras:
    def __init__(self, slots: SlotTable, inputs: StepInputs, vocab_size: int, device: torch.device) -> None:
        self.slots, self.inputs, self.vocab_size, self.device = slots, inputs, vocab_size, device
        self.penalties: PenaltyState | None = None  # allocated for the first request with a penalty
        self.banned = torch.zeros(inputs.max_seqs, MAX_BANNED_IDS, dtype=torch.int64, device=device)  # [Smax, B]

    # ---- slot changes -----------------------------------------------------------------------------
    def on_fills(self, fills: SlotFill) -> None:
        """After SlotTable.apply: clear refilled slots' penalty rows, load their banned ids."""
        if not len(fills):
            return
        if self.penalties is None and bool(self.slots.penalized[fills.slots].any()):
            self.penalties = PenaltyState(self.inputs.max_seqs, self.vocab_size, self.device)
        if self.penalties is not None:
            self.penalties.clear(torch.from_numpy(fills.slots.astype(np.int64)).to(self.device))
            forked = fills.prompt_from >= 0 if len(fills.prompt_from) else np.zeros(len(fills), bool)
            if forked.any():  # n > 1: the shared prompt ran in the parent's slot only
                self.penalties.copy_prompt(torch.from_numpy(fills.prompt_from[forked].astype(np.int64)).to(self.device),
                                           torch.from_numpy(fills.slots[forked].astype(np.int64)).to(self.device))
        if len(fills.ban_slots):  # rare (min_tokens requests): a small copy of their rows
            slots = torch.from_numpy(fills.ban_slots.astype(np.int64)).to(self.device)
            self.banned.index_copy_(0, slots, torch.from_numpy(fills.banned).to(self.device))

    # ---- host staging -----------------------------------------------------------------------------
    def stage(self, h: dict[str, np.ndarray], b: RankBatch, rows: np.ndarray, sample_slots: np.ndarray,
              context_lens: np.ndarray, hot_pick, num_hot: int, any_hot: bool) -> ExtraFlags:
        """Fill this step's per-row values. rows [R] sequence index of each sampling row,
        sample_slots [R] their slots, context_lens [S] tokens in the KV after the step,
        hot_pick: the drawing rows among R (a slice or an index array), num_hot of them."""
        t = self.slots
        if not t.any_extras:
            return NO_EXTRAS
        record = bool(t.penalized[b.slots].any())
        if record:
            s = b.num_seqs
            h["seq_slots"][:s] = b.slots
            h["prompt_lens"][:s] = t.prompt_lens[b.slots]
        r = len(rows)
        penalize = record and bool(t.penalized[sample_slots].any())
        if penalize:
            h["repetition"][:r] = t.repetition[sample_slots]
            h["presence"][:r] = t.presence[sample_slots]
            h["frequency"][:r] = t.frequency[sample_slots]
        min_p = False
        if any_hot:
            hot_min_p = t.min_p[sample_slots[hot_pick]]
            min_p = bool((hot_min_p > 0).any())
            if min_p:
                h["min_p"][:num_hot] = hot_min_p
        min_tokens = t.min_tokens[sample_slots]
        ban = False
        if min_tokens.any():  # generated before this row's token: its position minus the prompt
            under = context_lens[rows] - t.prompt_lens[sample_slots] < min_tokens
            ban = bool(under.any())
            if ban:
                h["ban_rows"][:r] = under
        top = bool(t.top_logprobs[sample_slots].any())
        if not (record or min_p or ban or top):
            return NO_EXTRAS
        return ExtraFlags(record=record, penalize=penalize, min_p=min_p, ban=ban, top=top)

    # ---- device -----------------------------------------------------------------------------------
    def record(self, flags: ExtraFlags, input_ids: torch.Tensor, num_seqs: int) -> None:
        """Count the step's input tokens [T] into their slots' penalty rows (before sampling)."""
        if not flags.record:
            return
        d, t, s = self.inputs.dev, input_ids.shape[0], num_seqs
        self.penalties.record(input_ids, d["positions"][:t], d["cu_seqlens"][:s + 1], d["seq_slots"][:s],
                              d["prompt_lens"][:s])

    def sampling_fields(self, flags: ExtraFlags, num_samples: int, num_hot: int) -> dict:
        """The SamplingBatch fields of this step's extras (all None when no row asks)."""
        d, r = self.inputs.dev, num_samples
        fields = {}
        if flags.penalize:
            slots = d["sample_slots"][:r]
            fields["penalties"] = (self.penalties, PenaltyParams(slots, d["repetition"][:r], d["presence"][:r],
                                                                 d["frequency"][:r]))
        if flags.min_p:
            fields["min_p"] = d["min_p"][:num_hot]
        if flags.ban:
            fields["banned"] = self.banned.index_select(0, d["sample_slots"][:r])  # [R, B]
            fields["ban_rows"] = d["ban_rows"][:r]
        return fields


def top_logprobs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] -> (ids [R, K] int64, logprobs [R, K] float32) of the K most likely tokens of
    the raw distribution, best first; K = min(MAX_TOP_LOGPROBS, V) whatever the rows asked."""
    k = min(MAX_TOP_LOGPROBS, logits.shape[1])
    values, ids = logits.float().log_softmax(dim=1).topk(k, dim=1)
    return ids, values


def prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [P, V] at prompt positions, targets [P] the next prompt token -> ([P] float32 logprobs,
    [P, K] int64 ids, [P, K] float32 logprobs of the K most likely tokens, K as top_logprobs). The
    top K come with every prompt row: echo with top-N logprobs needs them, and the rows are few
    (only requests asking for prompt logprobs have any), so one shape serves all."""
    lps = logits.float().log_softmax(dim=1)
    k = min(MAX_TOP_LOGPROBS, logits.shape[1])
    values, ids = lps.topk(k, dim=1)
    return lps.gather(1, targets[:, None])[:, 0], ids, values
