"""Collects one rank's share of a step while the scheduler walks its sequences, then packs it
into a RankBatch (numpy arrays) in one go: per sequence only a few list appends."""
from __future__ import annotations

import numpy as np

from ..worker.sampler import sampling_temperature, seed_key
from .sequence import Sequence
from ..worker.step_plan import MAX_BANNED_IDS, BlockAppends, RankBatch, SlotFill

_NO_ROWS = np.zeros(0, dtype=np.int64)


class RankBatchBuilder:
    def __init__(self, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.eos_token_ids = eos_token_ids  # what min_tokens holds back, with each request's stop ids
        self.slots: list[int] = []
        self.query_lens: list[int] = []
        self.start_pos: list[int] = []
        self.from_device: list[bool] = []
        self.samples: list[bool] = []
        self.tokens: list[int] = []
        self.sampling: list[Sequence] = []  # sequences whose rows sample, in row order (rank 0 only)
        self.num_tokens = 0
        self.routed_rows: list[int] = []  # token rows whose routed experts come back (RankBatch.routed_rows)
        self.routed: list[tuple[Sequence, int]] = []  # (sequence, rows of routed_rows) in order (rank 0 only)
        self.prompt_lp_rows: list[int] = []  # token rows whose next prompt token's logprob comes back
        self.prompt_lp_targets: list[int] = []
        self.prompt_lp: list[tuple[Sequence, int]] = []  # (sequence, rows of prompt_lp_rows) in order (rank 0 only)
        self._fills: list[Sequence] = []
        self._app_slots: list[int] = []
        self._app_cols: list[int] = []
        self._app_blocks: list[int] = []

    def add(self, seq: Sequence, n: int) -> None:
        """`seq` runs its next `n` tokens this step; advances its computed (and pending) counts."""
        start = seq.num_computed
        from_device = seq.num_pending > 0  # its one new token is the one its slot sampled last step
        last = start + n == seq.total_len
        if seq.routed_from >= 0:
            self._route(seq, start, n)
        if seq.prompt_lp_from >= 0:
            self._prompt_rows(seq, start, n)
        self.num_tokens += n
        self.slots.append(seq.slot)
        self.query_lens.append(n)
        self.start_pos.append(start)
        self.from_device.append(from_device)
        self.samples.append(last)
        if not from_device:
            if n == 1:
                self.tokens.append(seq.token_ids[start])
            else:
                self.tokens.extend(seq.token_ids[start:start + n])
        seq.num_computed = start + n
        if last:
            seq.num_pending += 1
            self.sampling.append(seq)

    def add_decode(self, seq: Sequence) -> None:
        """add(seq, 1) for a decoding sequence (its one new token is its last: it samples)."""
        start = seq.num_computed
        if seq.routed_from >= 0:
            self._route(seq, start, 1)
        self.num_tokens += 1
        self.slots.append(seq.slot)
        self.query_lens.append(1)
        self.start_pos.append(start)
        if seq.num_pending:
            self.from_device.append(True)
        else:
            self.from_device.append(False)
            self.tokens.append(seq.token_ids[start])
        self.samples.append(True)
        seq.num_computed = start + 1
        seq.num_pending += 1
        self.sampling.append(seq)

    def _route(self, seq: Sequence, start: int, n: int) -> None:
        """Positions start..start+n-1 run this step: return the rows of those not yet sent."""
        first = max(start, seq.routed_from)
        if first < start + n:
            base = self.num_tokens - start
            self.routed_rows.extend(range(base + first, base + start + n))
            self.routed.append((seq, start + n - first))
            seq.routed_from = start + n

    def _prompt_rows(self, seq: Sequence, start: int, n: int) -> None:
        """Positions start..start+n-1 run: those before the prompt's last one predict the next
        prompt token, whose logprob goes back (once, even if a preemption recomputes them)."""
        first, end = max(start, seq.prompt_lp_from), min(start + n, seq.num_prompt_tokens - 1)
        if first < end:
            base = self.num_tokens - start
            self.prompt_lp_rows.extend(range(base + first, base + end))
            self.prompt_lp_targets.extend(seq.token_ids[first + 1:end + 1])
            self.prompt_lp.append((seq, end - first))
            seq.prompt_lp_from = end

    def fill(self, seq: Sequence) -> None:
        """`seq` takes its slot this step (admission): the slot's sampling parameters and an empty table."""
        self._fills.append(seq)

    def append_blocks(self, slot: int, first_col: int, blocks: list[int]) -> None:
        self._app_slots.extend([slot] * len(blocks))
        self._app_cols.extend(range(first_col, first_col + len(blocks)))
        self._app_blocks.extend(blocks)

    def build(self) -> RankBatch:
        fills = SlotFill.empty()
        if self._fills:
            reqs = [s.request for s in self._fills]
            fills = SlotFill(
                slots=np.array([s.slot for s in self._fills], dtype=np.int32),
                temperature=np.array([sampling_temperature(r.sampling.temperature, r.sampling.top_k) for r in reqs],
                                     dtype=np.float32),
                top_p=np.array([r.sampling.top_p for r in reqs], dtype=np.float32),
                top_k=np.array([r.sampling.top_k for r in reqs], dtype=np.int32),
                seed_keys=np.array([seed_key(s.seed) for s in self._fills], dtype=np.int64),
                logprobs=np.array([r.logprobs for r in reqs], dtype=bool),
                min_p=np.array([r.sampling.min_p for r in reqs], dtype=np.float32),
                repetition=np.array([r.sampling.repetition_penalty for r in reqs], dtype=np.float32),
                presence=np.array([r.sampling.presence_penalty for r in reqs], dtype=np.float32),
                frequency=np.array([r.sampling.frequency_penalty for r in reqs], dtype=np.float32),
                prompt_lens=np.array([s.num_prompt_tokens for s in self._fills], dtype=np.int64),
                min_tokens=np.array([r.stops.min_tokens for r in reqs], dtype=np.int64),
                top_logprobs=np.array([r.top_logprobs for r in reqs], dtype=np.int32),
                prompt_from=np.array([s.forked_from_slot for s in self._fills], dtype=np.int32),
                **self._banned(reqs),
            )
        appends = BlockAppends.empty()
        if self._app_slots:
            appends = BlockAppends(np.array(self._app_slots, dtype=np.int32), np.array(self._app_cols, dtype=np.int32),
                                   np.array(self._app_blocks, dtype=np.int32))
        return RankBatch(
            slots=np.array(self.slots, dtype=np.int32),
            query_lens=np.array(self.query_lens, dtype=np.int32),
            start_pos=np.array(self.start_pos, dtype=np.int64),
            from_device=np.array(self.from_device, dtype=bool),
            samples=np.array(self.samples, dtype=bool),
            tokens=np.array(self.tokens, dtype=np.int64),
            fills=fills,
            appends=appends,
            routed_rows=np.array(self.routed_rows, dtype=np.int64) if self.routed_rows else _NO_ROWS,
            prompt_lp_rows=np.array(self.prompt_lp_rows, dtype=np.int64) if self.prompt_lp_rows else _NO_ROWS,
            prompt_lp_targets=np.array(self.prompt_lp_targets, dtype=np.int64) if self.prompt_lp_rows else _NO_ROWS,
        )

    def _banned(self, reqs) -> dict:
        """SlotFill.ban_slots / banned of the fills with min_tokens: each row the ids held back
        (stop_token_ids, and EOS unless ignore_eos), padded by repeating its first id."""
        slots, rows = [], []
        for seq, req in zip(self._fills, reqs):
            if req.stops.min_tokens <= 0:
                continue
            ids = list(dict.fromkeys(tuple(req.stops.stop_token_ids) + (() if req.stops.ignore_eos else self.eos_token_ids)))
            if not ids:
                continue
            if len(ids) > MAX_BANNED_IDS:
                raise ValueError(f"min_tokens holds back {len(ids)} token ids; at most {MAX_BANNED_IDS}")
            slots.append(seq.slot)
            rows.append(ids + [ids[0]] * (MAX_BANNED_IDS - len(ids)))
        if not slots:
            return {}
        return {"ban_slots": np.array(slots, dtype=np.int32), "banned": np.array(rows, dtype=np.int64)}
