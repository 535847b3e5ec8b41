"""A fixed multi-step serving scenario shared by the model tests, the EP rank workers and the
references: mixed prompt lengths, a chunked prefill, late arrivals, a sequence that finishes
early, and (at ep 4) ranks with no tokens in a step. Decode tokens are fixed in advance
(teacher forcing), so every step's logits have an exact transformers counterpart."""
from __future__ import annotations

import random

Step = list[tuple[int, list[int]]]  # (seq_id, new tokens) in batch order


def make_scenario(vocab_size: int, seed: int = 0) -> list[Step]:
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(vocab_size) for _ in range(n)]  # noqa: E731
    a, b, c, d1, d2, e = tok(7), tok(3), tok(5), tok(5), tok(4), tok(4)
    return [
        [(0, a), (1, b), (3, d1)],  # prefill A, B, first chunk of D (ep4: rank 2 idle)
        [(0, tok(1)), (1, tok(1)), (2, c), (3, d2)],  # decode A, B; prefill C; D's second chunk
        [(0, tok(1)), (1, tok(1)), (2, tok(1)), (3, tok(1))],  # decode all
        [(0, tok(1)), (2, tok(1)), (3, tok(1)), (4, e)],  # B finished (ep4: rank 1 idle); E arrives
        [(0, tok(1)), (2, tok(1)), (4, tok(1))],
    ]


def rank_of(seq_id: int, ep_size: int) -> int:
    return seq_id % ep_size


def rank_work(step: Step, ep_size: int, rank: int) -> tuple[Step, int]:
    """This rank's share of a step (data-parallel attention) and its global token offset."""
    work = [(s, t) for s, t in step if rank_of(s, ep_size) == rank]
    offset = sum(len(t) for s, t in step if rank_of(s, ep_size) < rank)
    return work, offset


def full_sequences(scenario: list[Step]) -> dict[int, list[int]]:
    """seq_id -> every token it is fed over the scenario, in order."""
    seqs: dict[int, list[int]] = {}
    for step in scenario:
        for sid, tokens in step:
            seqs.setdefault(sid, []).extend(tokens)
    return seqs


def expected_positions(scenario: list[Step]) -> dict[tuple[int, int], int]:
    """(step, seq_id) -> position of the seq's last new token in that step."""
    lens: dict[int, int] = {}
    out = {}
    for i, step in enumerate(scenario):
        for sid, tokens in step:
            lens[sid] = lens.get(sid, 0) + len(tokens)
            out[(i, sid)] = lens[sid] - 1
    return out


def run_scenario(model, scenario: list[Step], ep_size: int = 1, rank: int = 0) -> dict[tuple[int, int], "object"]:
    """Drive `model` (this rank's shard) through the scenario; -> {(step, seq_id): logits [V]}."""
    from .paged_driver import PagedDriver

    driver = PagedDriver(model, seed=rank)
    out = {}
    for i, step in enumerate(scenario):
        work, offset = rank_work(step, ep_size, rank)
        for sid, logits in driver.step(work, offset).items():
            out[(i, sid)] = logits
    return out
