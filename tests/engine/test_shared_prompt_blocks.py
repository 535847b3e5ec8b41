"""n > 1 in the scheduler: the request's sequences share their prompt's full KV blocks.

Driven step by step without a model; every assertion is on the block manager's accounting
and the rows the plans carry."""
from __future__ import annotations

import numpy as np

from server.core.block_manager import BlockManager
from server.core.scheduler import Scheduler
from server.core.sequence import Sequence, SeqStatus
from server.engine.api import GenerationRequest, StopParams
from server.worker.step_plan import RankResult

BS = 4
PROMPT = tuple(range(10, 23))  # 13 tokens: 3 full blocks (12 tokens) shared, the 13th computed by each


def _seq(seq_id: int, max_new: int = 6) -> Sequence:
    req = GenerationRequest(f"r{seq_id}", PROMPT, stops=StopParams(max_new_tokens=max_new))
    return Sequence.create(seq_id, req, seed=seq_id, max_total_len=len(PROMPT) + max_new, now=0.0)


def _results(plan) -> list[RankResult]:
    """Token 1 for every sampling row (the scheduler only counts them)."""
    return [RankResult(plan.step, r, tokens=np.ones(len(rows), dtype=np.int64)) for r, rows in enumerate(plan.sampling)]


def _rows(plan) -> dict[int, tuple[int, int]]:
    b = plan.ranks[0].batch
    return {slot: (start, n) for slot, start, n in zip(b.slots.tolist(), b.start_pos.tolist(), b.query_lens.tolist())}


def test_block_manager_frees_a_shared_block_with_its_last_holder() -> None:
    bm = BlockManager(8, BS)
    blocks = bm.allocate(3)
    bm.share(blocks[:2])
    bm.free(blocks)
    assert bm.num_used == 2 and bm.num_free == 6
    bm.free(blocks[:2])
    assert bm.num_used == 0 and bm.num_free == 8


def test_forked_sequences_share_the_prompts_full_blocks() -> None:
    sch = Scheduler(num_ranks=1, num_blocks=32, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64, max_queue=8)
    parent, children = _seq(0), [_seq(i) for i in (1, 2, 3)]
    sch.add(parent)
    for child in children:
        sch.add_fork(child, parent, shared_len=12)
    bm = sch.blocks[0]

    first = sch.plan()  # the parent's prompt; the others wait for its blocks to be planned
    assert _rows(first) == {parent.slot: (0, 13)}
    assert all(c.status is SeqStatus.WAITING for c in children) and sch.num_waiting == 3
    assert bm.num_used == 4
    sch.update(first, _results(first))

    second = sch.plan()  # the others start on the shared blocks: one own block each for token 13
    rows = _rows(second)
    assert rows[parent.slot] == (13, 1)
    assert all(rows[c.slot] == (12, 1) for c in children)
    assert all(c.block_table[:3] == parent.block_table[:3] for c in children)
    assert len({c.block_table[3] for c in children} | {parent.block_table[3]}) == 4  # the partial block is each one's own
    assert bm.num_used == 4 + 3  # not 4 x 4: the three full prompt blocks are held once
    fills = second.ranks[0].batch.fills
    assert sorted(fills.prompt_from.tolist()) == [parent.slot] * 3  # penalty prompt sets come from the parent's slot
    sch.update(second, _results(second))

    sch.finish(parent)  # the parent ends first: the children still hold the shared blocks
    assert bm.num_used == 3 + 3
    for child in children:
        sch.finish(child)
    assert bm.num_used == 0 and not sch.has_work()


def test_a_fork_whose_parent_ended_recomputes_its_prompt_alone() -> None:
    sch = Scheduler(num_ranks=1, num_blocks=32, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64, max_queue=8)
    parent, child = _seq(0), _seq(1)
    sch.add(parent)
    sch.add_fork(child, parent, shared_len=12)
    first = sch.plan()
    sch.finish(parent)  # cancelled before the child could fork
    sch.update(first, _results(first))
    second = sch.plan()
    assert _rows(second) == {child.slot: (0, 13)}
    assert sch.blocks[0].num_used == 4 and child.forked_from_slot == -1
