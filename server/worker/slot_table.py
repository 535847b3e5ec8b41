"""Per-slot state of one rank's running sequences (host side): block tables and sampling.

A plan says only what changed (step_plan.SlotFill, BlockAppends); this table holds the rest,
so a step's block tables and sampling parameters are numpy gathers by slot, not lists rebuilt
from every sequence. Rank 0 keeps one per rank implicitly through its plans; every rank (rank
0 included) applies the updates of each plan, in order, before running it.
"""
from __future__ import annotations

import numpy as np

from .step_plan import MAX_BANNED_IDS, BlockAppends, SlotFill


class SlotTable:
    def __init__(self, max_seqs: int, width: int) -> None:
        self.width = width
        self.block_tables = np.zeros((max_seqs, width), dtype=np.int32)  # [Smax, W]
        self.temperature = np.zeros(max_seqs, dtype=np.float32)
        self.top_p = np.ones(max_seqs, dtype=np.float32)
        self.top_k = np.zeros(max_seqs, dtype=np.int64)
        self.seed_keys = np.zeros(max_seqs, dtype=np.int64)
        self.logprobs = np.zeros(max_seqs, dtype=bool)
        self.min_p = np.zeros(max_seqs, dtype=np.float32)
        self.repetition = np.ones(max_seqs, dtype=np.float32)
        self.presence = np.zeros(max_seqs, dtype=np.float32)
        self.frequency = np.zeros(max_seqs, dtype=np.float32)
        self.penalized = np.zeros(max_seqs, dtype=bool)  # some penalty is on
        self.prompt_lens = np.zeros(max_seqs, dtype=np.int64)
        self.min_tokens = np.zeros(max_seqs, dtype=np.int64)
        self.top_logprobs = np.zeros(max_seqs, dtype=np.int32)
        self.banned = np.zeros((max_seqs, MAX_BANNED_IDS), dtype=np.int64)  # ids min_tokens holds back
        #: some slot (live, or left by a finished sequence) uses a feature of sampling_extras.py;
        #: False lets a step skip their staging altogether
        self.any_extras = False

    def apply(self, fills: SlotFill, appends: BlockAppends) -> None:
        if len(fills):
            s = fills.slots
            self.block_tables[s] = 0
            self.temperature[s] = fills.temperature
            self.top_p[s] = fills.top_p
            self.top_k[s] = fills.top_k
            self.seed_keys[s] = fills.seed_keys
            self.logprobs[s] = fills.logprobs
            self.min_p[s] = fills.min_p
            self.repetition[s] = fills.repetition
            self.presence[s] = fills.presence
            self.frequency[s] = fills.frequency
            self.penalized[s] = (fills.repetition != 1) | (fills.presence != 0) | (fills.frequency != 0)
            self.prompt_lens[s] = fills.prompt_lens
            self.min_tokens[s] = fills.min_tokens
            self.top_logprobs[s] = fills.top_logprobs
            if len(fills.ban_slots):
                self.banned[fills.ban_slots] = fills.banned
            self.any_extras = bool(self.penalized.any() or self.min_p.any() or self.min_tokens.any()
                                   or self.top_logprobs.any())
        if len(appends):
            if int(appends.cols.max()) >= self.width:
                raise ValueError(f"a block table grew past {self.width} blocks (max_model_len / kv_block_size)")
            self.block_tables[appends.slots, appends.cols] = appends.blocks
