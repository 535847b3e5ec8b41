"""Scheduler and block manager: continuous batching, chunked prefill, rank assignment,
admission control and preemption — driven without a model (tokens from a fixed function of
the sequence so far, so a sequence's output is known independently of scheduling), one step
at a time and overlapped (step n+1 planned before step n's tokens are applied)."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from server.engine.api import GenerationRequest, ResourceExhaustedError, StopParams
from server.core.block_manager import BlockManager, blocks_for
from server.core.scheduler import Scheduler
from server.core.sequence import Sequence, SeqStatus
from server.worker.step_plan import RankPlan, RankResult

VOCAB = 97


def next_token(tokens: list[int]) -> int:
    """Deterministic 'model': depends on the whole history, like a real one."""
    h = 17
    for t in tokens:
        h = (h * 31 + t) % 1_000_003
    return h % VOCAB


def make_seq(seq_id: int, prompt_len: int, max_new: int, max_model_len: int = 10_000) -> Sequence:
    req = GenerationRequest(f"r{seq_id}", tuple((seq_id * 7 + i) % VOCAB for i in range(prompt_len)),
                            stops=StopParams(max_new_tokens=max_new))
    return Sequence.create(seq_id, req, seed=seq_id, max_total_len=min(prompt_len + max_new, max_model_len), now=0.0)


def check_invariants(sch: Scheduler) -> None:
    for r, bm in enumerate(sch.blocks):
        owned = [b for seq in sch.running[r] for b in seq.block_table]
        assert len(owned) == len(set(owned)), "a KV block is shared by two sequences"
        assert len(owned) == bm.num_used
        for seq in sch.running[r]:
            assert seq.rank == r and seq.status is SeqStatus.RUNNING
            assert len(seq.block_table) >= blocks_for(seq.num_computed, sch.block_size)
    for seq in sch.waiting:
        assert seq.block_table == [] and seq.rank == -1


class FakeRank:
    """A rank without a model: it keeps what a real rank keeps (each slot's block table and
    last sampled token) plus each slot's token history, from the plans alone, and samples
    next_token(history). Checks that rows start where the slot's history ends."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.history: dict[int, list[int]] = {}
        self.tables: dict[int, dict[int, int]] = {}
        self.last: dict[int, int] = {}

    def run(self, plan: RankPlan) -> RankResult:
        b = plan.batch
        for slot in b.fills.slots.tolist():
            self.history[slot], self.tables[slot] = [], {}
        for slot, col, block in zip(b.appends.slots.tolist(), b.appends.cols.tolist(), b.appends.blocks.tolist()):
            self.tables[slot][col] = block
        explicit = iter(b.tokens.tolist())
        out = []
        for slot, n, start, dev, samples in zip(b.slots.tolist(), b.query_lens.tolist(), b.start_pos.tolist(),
                                                 b.from_device.tolist(), b.samples.tolist()):
            hist = self.history[slot]
            del hist[start:]  # a wasted row of a finished sequence may have run past a refill's start
            assert len(hist) == start, (slot, len(hist), start)
            if dev:
                assert n == 1
                hist.append(self.last[slot])
            else:
                hist.extend(next(explicit) for _ in range(n))
            assert all(c in self.tables[slot] for c in range(blocks_for(len(hist), self.block_size)))
            if samples:
                self.last[slot] = next_token(hist)
                out.append(self.last[slot])
        assert next(explicit, None) is None
        return RankResult(plan.step, 0, tokens=np.array(out, dtype=np.int64))


def rows(sch: Scheduler, plan, rank: int = 0) -> dict[int, int]:
    """seq_id -> tokens in this step, for the running sequences of `rank`."""
    by_slot = {s.slot: s.seq_id for s in sch.running[rank]}
    b = plan.ranks[rank].batch
    return {by_slot[slot]: n for slot, n in zip(b.slots.tolist(), b.query_lens.tolist())}


def drive(sch: Scheduler, max_steps: int = 10_000, on_step=None, overlap: bool = False) -> dict[int, list[int]]:
    """Run the scheduler to completion with the fake model; return generated tokens per seq.
    `overlap`: plan and run step n+1 before applying step n (as the engine does)."""
    done: dict[int, list[int]] = {}
    ranks = [FakeRank(sch.block_size) for _ in range(sch.num_ranks)]
    inflight: deque = deque()

    def apply(plan, results) -> None:
        for seq, _, _ in sch.update(plan, results):
            if seq.num_generated >= seq.request.stops.max_new_tokens:
                done[seq.seq_id] = seq.token_ids[seq.num_prompt_tokens:]
                sch.finish(seq)

    for _ in range(max_steps):
        if not sch.has_work() and not inflight:
            return done
        plan = sch.plan()
        check_invariants(sch)
        ran = plan.ranks[0].run_forward
        if ran:
            inflight.append((plan, [rank.run(p) for rank, p in zip(ranks, plan.ranks)]))
        while len(inflight) > (1 if overlap and ran else 0):
            apply(*inflight.popleft())
        if on_step:
            on_step(plan)
    raise AssertionError("scheduler did not finish")


def step(sch: Scheduler, ranks: list[FakeRank]):
    plan = sch.plan()
    return plan, [rank.run(p) for rank, p in zip(ranks, plan.ranks)]


def reference(seq: Sequence) -> list[int]:
    tokens = list(seq.request.prompt_token_ids)
    for _ in range(seq.request.stops.max_new_tokens):
        tokens.append(next_token(tokens))
    return tokens[seq.num_prompt_tokens:]


def make_scheduler(**kw) -> Scheduler:
    args = dict(num_ranks=1, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_queue=16)
    args.update(kw)
    return Scheduler(**args)


def test_block_manager_allocates_and_frees() -> None:
    bm = BlockManager(4, 16)
    a = bm.allocate(3)
    assert bm.num_free == 1 and not bm.can_allocate(2)
    with pytest.raises(RuntimeError):
        bm.allocate(2)
    bm.free(a)
    assert bm.num_free == 4
    with pytest.raises(RuntimeError):
        bm.free(a)
    assert blocks_for(0, 16) == 0 and blocks_for(16, 16) == 1 and blocks_for(17, 16) == 2


def test_chunked_prefill_respects_the_token_budget_and_batches_decodes() -> None:
    sch = make_scheduler(max_num_batched_tokens=8)
    seqs = [make_seq(i, prompt_len=20, max_new=3) for i in range(2)]
    for s in seqs:
        sch.add(s)
    budgets = []
    drive(sch, on_step=lambda plan: budgets.append(int(plan.ranks[0].batch.query_lens[plan.ranks[0].batch.query_lens > 1].sum())))
    assert max(budgets) <= 8


def test_new_requests_join_a_running_batch() -> None:
    sch = make_scheduler()
    first = make_seq(0, prompt_len=5, max_new=20)
    sch.add(first)
    ranks = [FakeRank(sch.block_size)]
    for _ in range(3):  # first is decoding now
        sch.update(*step(sch, ranks))
    late = make_seq(1, prompt_len=6, max_new=2)
    sch.add(late)
    plan = sch.plan()
    assert rows(sch, plan) == {0: 1, 1: 6}  # a decode and a whole prefill in the same step


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_results_do_not_depend_on_batching_or_chunking(overlap) -> None:
    seqs = [make_seq(i, prompt_len=3 + 5 * i, max_new=4 + i) for i in range(6)]
    expected = {s.seq_id: reference(s) for s in seqs}
    sch = make_scheduler(num_ranks=2, max_num_batched_tokens=7, max_num_seqs=2)
    for s in seqs:
        sch.add(s)
    assert drive(sch, overlap=overlap) == expected
    assert sch.kv_blocks_used == 0 and sch.num_running == 0


def test_sequences_spread_over_ranks_and_token_offsets_add_up() -> None:
    sch = make_scheduler(num_ranks=3)
    for i in range(6):
        sch.add(make_seq(i, prompt_len=4 + i, max_new=2))
    plan = sch.plan()
    per_rank = [p.batch.num_seqs for p in plan.ranks]
    assert per_rank == [2, 2, 2]
    counts = [p.batch.num_tokens for p in plan.ranks]
    assert [p.token_offset for p in plan.ranks] == [0, counts[0], counts[0] + counts[1]]
    assert all(p.run_forward for p in plan.ranks)


def test_an_idle_rank_still_runs_the_forward_when_another_has_work() -> None:
    sch = make_scheduler(num_ranks=2)
    sch.add(make_seq(0, prompt_len=4, max_new=2))
    plan = sch.plan()
    assert [p.batch.num_seqs for p in plan.ranks] == [1, 0]
    assert plan.ranks[1].run_forward and plan.ranks[1].token_offset == 4


def test_plans_carry_the_common_row_count_and_the_decode_bucket_size() -> None:
    """Every rank gets the same ep_rows (the largest rank's tokens: fixed-capacity EP dispatch pads
    to it) and, in pure-decode steps only, the same decode_batch (ranks replay one graph bucket)."""
    sch = make_scheduler(num_ranks=3, max_num_batched_tokens=6)
    for i, n in enumerate([5, 3, 9, 2]):
        sch.add(make_seq(i, prompt_len=n, max_new=3))

    def on_step(plan) -> None:
        if not plan.ranks[0].run_forward:
            return
        counts = [p.batch.num_tokens for p in plan.ranks]
        decoding = all(bool((p.batch.query_lens == 1).all()) for p in plan.ranks)
        want = max(p.batch.num_seqs for p in plan.ranks) if decoding else None
        assert {p.ep_rows for p in plan.ranks} == {max(counts)}
        assert {p.decode_batch for p in plan.ranks} == {want}
        seen.add(want is not None)

    seen: set[bool] = set()
    drive(sch, on_step=on_step, overlap=True)
    assert seen == {True, False}  # both kinds of step happened


def test_queue_bound_and_never_fitting_requests_are_refused() -> None:
    sch = make_scheduler(num_blocks=4, block_size=4, max_queue=2)  # 16 KV tokens per rank
    with pytest.raises(ResourceExhaustedError, match="kv_cache_tokens"):
        sch.add(make_seq(0, prompt_len=10, max_new=8))  # needs 17 cached tokens
    sch.add(make_seq(1, prompt_len=10, max_new=7))  # exactly 16: fits
    sch.add(make_seq(2, prompt_len=2, max_new=2))
    with pytest.raises(ResourceExhaustedError, match="max_queue"):
        sch.add(make_seq(3, prompt_len=2, max_new=2))


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_preemption_recomputes_and_changes_nothing(overlap) -> None:
    # 6 blocks of 4 tokens; three sequences that each grow to 16 tokens cannot all stay.
    seqs = [make_seq(i, prompt_len=5, max_new=11) for i in range(3)]
    expected = {s.seq_id: reference(s) for s in seqs}
    sch = make_scheduler(num_blocks=6, block_size=4)
    for s in seqs:
        sch.add(s)
    assert drive(sch, overlap=overlap) == expected
    assert sch.num_preemptions > 0
    assert sch.kv_blocks_used == 0


def test_finish_frees_blocks_at_once_wherever_the_sequence_is() -> None:
    sch = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=1)
    a, b = make_seq(0, prompt_len=9, max_new=4), make_seq(1, prompt_len=3, max_new=4)
    sch.add(a)
    sch.add(b)
    sch.plan()
    assert a.status is SeqStatus.RUNNING and b.status is SeqStatus.WAITING  # max_num_seqs=1
    assert sch.kv_blocks_used == 3
    sch.finish(b)
    sch.finish(a)
    sch.finish(a)  # idempotent
    assert sch.kv_blocks_used == 0 and sch.num_running == 0 and sch.num_waiting == 0
    assert not sch.has_work()


def test_cancel_during_a_step_ignores_its_result() -> None:
    sch = make_scheduler()
    a = make_seq(0, prompt_len=4, max_new=4)
    sch.add(a)
    plan, results = step(sch, [FakeRank(sch.block_size)])
    sch.finish(a)
    assert sch.update(plan, results) == []
    assert a.token_ids == list(a.request.prompt_token_ids)


def test_overlapped_steps_decode_from_the_device_and_drop_rows_of_finished_sequences() -> None:
    """Step n+1 is planned before step n's token lands: its row reads the slot's last sampled
    token (from_device) at the next position; a sequence finished after step n keeps no token
    of step n+1, and one whose in-flight token is its last by length is not scheduled."""
    sch = make_scheduler()
    a, b = make_seq(0, prompt_len=3, max_new=5), make_seq(1, prompt_len=2, max_new=2)
    sch.add(a)
    sch.add(b)
    ranks = [FakeRank(sch.block_size)]
    p1, r1 = step(sch, ranks)  # prefills; each samples its first token
    assert p1.ranks[0].batch.from_device.tolist() == [False, False]
    p2, r2 = step(sch, ranks)  # planned before p1's tokens are known
    batch = p2.ranks[0].batch
    assert batch.from_device.tolist() == [True, True] and batch.start_pos.tolist() == [3, 2]
    assert len(batch.tokens) == 0 and (a.num_pending, b.num_pending) == (2, 2)  # p1's and p2's tokens
    out = sch.update(p1, r1)
    assert [(s.seq_id, t) for s, t, _ in out] == [(0, r1[0].tokens[0]), (1, r1[0].tokens[1])]
    p3, r3 = step(sch, ranks)  # b's token in flight (from p2) is its last: b is not scheduled
    assert rows(sch, p3) == {0: 1}
    sch.finish(a)  # a stops (say, EOS) after p2: p2's and p3's tokens for it must go nowhere
    assert [s.seq_id for s, _, _ in sch.update(p2, r2)] == [1]
    assert sch.update(p3, r3) == []
    assert b.num_generated == 2 and a.num_generated == 1
