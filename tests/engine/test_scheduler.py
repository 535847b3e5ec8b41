"""Scheduler and block manager: continuous batching, chunked prefill, rank assignment,
admission control and preemption — driven without a model (tokens from a fixed function of
the sequence so far, so a sequence's output is known independently of scheduling)."""
from __future__ import annotations

import pytest

from server.engine.api import GenerationRequest, ResourceExhaustedError, StopParams
from server.engine.block_manager import BlockManager, blocks_for
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SeqStatus

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


def drive(sch: Scheduler, max_steps: int = 10_000, on_step=None) -> dict[int, list[int]]:
    """Run the scheduler to completion with the fake model; return generated tokens per seq."""
    done: dict[int, list[int]] = {}
    for _ in range(max_steps):
        if not sch.has_work():
            return done
        plan = sch.plan()
        check_invariants(sch)
        for rank_plan in plan.ranks:
            for w in rank_plan.work:
                assert len(w.block_table) * sch.block_size >= w.context_len
        sampled = {}
        for rank_plan in plan.ranks:
            for w in rank_plan.work:
                if w.sample is not None:
                    seq = sch.seqs[w.seq_id]
                    sampled[w.seq_id] = (next_token(seq.token_ids), None)
        for seq, _, _ in sch.update(plan, sampled):
            if seq.num_generated >= seq.request.stops.max_new_tokens:
                done[seq.seq_id] = seq.token_ids[seq.num_prompt_tokens:]
                sch.finish(seq)
        if on_step:
            on_step(plan)
    raise AssertionError("scheduler did not finish")


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
    drive(sch, on_step=lambda plan: budgets.append(sum(w.num_tokens for w in plan.ranks[0].work if w.num_tokens > 1)))
    assert max(budgets) <= 8


def test_new_requests_join_a_running_batch() -> None:
    sch = make_scheduler()
    first = make_seq(0, prompt_len=5, max_new=20)
    sch.add(first)
    for _ in range(3):  # first is decoding now
        plan = sch.plan()
        sch.update(plan, {w.seq_id: (next_token(sch.seqs[w.seq_id].token_ids), None)
                          for w in plan.ranks[0].work if w.sample})
    late = make_seq(1, prompt_len=6, max_new=2)
    sch.add(late)
    plan = sch.plan()
    by_id = {w.seq_id: w for w in plan.ranks[0].work}
    assert by_id[0].num_tokens == 1  # a decode ...
    assert by_id[1].num_tokens == 6  # ... and a whole prefill in the same step


def test_results_do_not_depend_on_batching_or_chunking() -> None:
    seqs = [make_seq(i, prompt_len=3 + 5 * i, max_new=4 + i) for i in range(6)]
    expected = {s.seq_id: reference(s) for s in seqs}
    sch = make_scheduler(num_ranks=2, max_num_batched_tokens=7, max_num_seqs=2)
    for s in seqs:
        sch.add(s)
    assert drive(sch) == expected
    assert sch.kv_blocks_used == 0 and sch.num_running == 0


def test_sequences_spread_over_ranks_and_token_offsets_add_up() -> None:
    sch = make_scheduler(num_ranks=3)
    for i in range(6):
        sch.add(make_seq(i, prompt_len=4 + i, max_new=2))
    plan = sch.plan()
    per_rank = [len(p.work) for p in plan.ranks]
    assert per_rank == [2, 2, 2]
    counts = [sum(w.num_tokens for w in p.work) for p in plan.ranks]
    assert [p.token_offset for p in plan.ranks] == [0, counts[0], counts[0] + counts[1]]
    assert all(p.run_forward for p in plan.ranks)


def test_an_idle_rank_still_runs_the_forward_when_another_has_work() -> None:
    sch = make_scheduler(num_ranks=2)
    sch.add(make_seq(0, prompt_len=4, max_new=2))
    plan = sch.plan()
    assert [len(p.work) for p in plan.ranks] == [1, 0]
    assert plan.ranks[1].run_forward and plan.ranks[1].token_offset == 4


def test_queue_bound_and_never_fitting_requests_are_refused() -> None:
    sch = make_scheduler(num_blocks=4, block_size=4, max_queue=2)  # 16 KV tokens per rank
    with pytest.raises(ResourceExhaustedError, match="kv_cache_tokens"):
        sch.add(make_seq(0, prompt_len=10, max_new=8))  # needs 17 cached tokens
    sch.add(make_seq(1, prompt_len=10, max_new=7))  # exactly 16: fits
    sch.add(make_seq(2, prompt_len=2, max_new=2))
    with pytest.raises(ResourceExhaustedError, match="max_queue"):
        sch.add(make_seq(3, prompt_len=2, max_new=2))


def test_preemption_recomputes_and_changes_nothing() -> None:
    # 6 blocks of 4 tokens; three sequences that each grow to 16 tokens cannot all stay.
    seqs = [make_seq(i, prompt_len=5, max_new=11) for i in range(3)]
    expected = {s.seq_id: reference(s) for s in seqs}
    sch = make_scheduler(num_blocks=6, block_size=4)
    for s in seqs:
        sch.add(s)
    assert drive(sch) == expected
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
    plan = sch.plan()
    sch.finish(a)
    assert sch.update(plan, {0: (5, None)}) == []
    assert a.token_ids == list(a.request.prompt_token_ids)
