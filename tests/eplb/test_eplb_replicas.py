"""EPLB replica choice (logical -> physical on the device) and expert-weight moves between
ranks (server/moe/eplb/replica_map.py, transfer.py)."""
from __future__ import annotations

import random

import pytest
import torch

from server.moe.eplb.placement import ExpertPlacement
from server.moe.eplb.replica_map import ReplicaMap
from server.moe.eplb.transfer import move_layer_experts, plan_layer_moves
from tests.helpers.ep_ranks import run_on_ranks


def test_hot_expert_tokens_spread_evenly_over_its_copies() -> None:
    # 4 experts in 6 slots over 2 ranks; expert 1 has 3 copies: slots 1, 4, 5
    placement = ExpertPlacement(4, 2, ((0, 1, 2, 3, 1, 1),))
    rmap = ReplicaMap(placement)
    ids = torch.tensor([[1, 0]] * 9 + [[2, 1]] * 3, dtype=torch.int32)  # [12, 2]
    phys = rmap(0, ids)
    assert phys.dtype == torch.int32 and phys.shape == ids.shape
    # token t takes copy t % 3 of expert 1: slots 1, 4, 5, 1, 4, 5, ...
    assert phys[:, 0][:9].tolist() == [1, 4, 5] * 3
    assert phys[9:, 1].tolist() == [1, 4, 5]  # tokens 9, 10, 11
    assert phys[:9, 1].tolist() == [0] * 9 and phys[9:, 0].tolist() == [2] * 3  # single-copy experts
    counts = torch.bincount(phys.reshape(-1).long(), minlength=6)
    assert counts[[1, 4, 5]].tolist() == [4, 4, 4]
    # The global token index decides: the same tokens on a later rank (offset 1) shift by one.
    assert rmap(0, ids[:3], token_offset=1)[:, 0].tolist() == [4, 5, 1]
    assert rmap(0, ids[:3], token_offset=torch.tensor(2))[:, 0].tolist() == [5, 1, 4]
    assert rmap(0, ids[:0]).shape == (0, 2)


def test_update_rewrites_the_tables_in_place() -> None:
    a = ExpertPlacement(4, 2, ((0, 1, 2, 3, 1, 1), (0, 1, 2, 3, 2, 3)))
    b = ExpertPlacement(4, 2, ((3, 3, 3, 2, 1, 0), (0, 1, 2, 3, 0, 0)))
    rmap = ReplicaMap(a)
    table, counts = rmap.table.data_ptr(), rmap.counts.data_ptr()
    rmap.update(b)
    assert rmap.table.data_ptr() == table and rmap.counts.data_ptr() == counts  # graph-safe
    ids = torch.tensor([[3, 0]] * 3, dtype=torch.int32)
    assert rmap(0, ids).tolist() == [[0, 5], [1, 5], [2, 5]]
    assert rmap(1, ids).tolist() == [[3, 0], [3, 4], [3, 5]]
    with pytest.raises(ValueError, match="cannot change"):
        rmap.update(ExpertPlacement(4, 1, ((0, 1, 2, 3, 1, 1), (0, 1, 2, 3, 2, 3))))


def test_move_plan_takes_local_copies_first_then_the_nearest_holder() -> None:
    old = [0, 1, 2, 3, 4, 5]  # ranks of 2: {0,1} {2,3} {4,5}
    new = [1, 5, 2, 2, 4, 0]
    moves = plan_layer_moves(old, new, 3)
    assert moves.keep[0] == [(1, 0)]  # rank 0 keeps expert 1, moving it to slot 0
    assert moves.recv[0][2] == [1] and moves.send[2][0] == [1]  # expert 5 from rank 2 (its slot 1)
    assert moves.keep[1] == [(0, 0), (0, 1)]  # expert 2 twice: both from its old slot 0
    assert moves.keep[2] == [(0, 0)] and moves.recv[2][0] == [1] and moves.send[0][2] == [0]  # expert 0 from rank 0
    assert moves.num_transfers == 2 and moves.num_local_copies == 2


def _fill(rank: int, slots: tuple[int, ...], per: int) -> list[torch.Tensor]:
    """Expert e's weights are e + small fixed offsets, so any misplaced row shows."""
    ids = torch.tensor(slots[rank * per:(rank + 1) * per], dtype=torch.float32)
    gate_up = ids[:, None, None] + torch.arange(6.0).view(1, 3, 2) / 10  # [S, 3, 2]
    down = -ids[:, None, None] - torch.arange(4.0).view(1, 2, 2) / 10  # [S, 2, 2]
    return [gate_up, down]


def _move_rank(rank: int, ep_size: int, old: tuple[int, ...], new: tuple[int, ...]) -> bool:
    per = len(old) // ep_size
    params = _fill(rank, old, per)
    ptrs = [p.data_ptr() for p in params]
    move_layer_experts(params, plan_layer_moves(old, new, ep_size), rank, ep_size)
    want = _fill(rank, new, per)
    return all(torch.equal(p, w) for p, w in zip(params, want)) and [p.data_ptr() for p in params] == ptrs


@pytest.mark.parametrize("ep_size", [1, 3])
def test_moved_weights_land_in_the_new_slots(ep_size) -> None:
    rng = random.Random(ep_size)
    num_experts, per = 6, 3 if ep_size == 3 else 8
    slots = per * ep_size

    def random_placement() -> tuple[int, ...]:
        row = list(range(num_experts)) + [rng.randrange(num_experts) for _ in range(slots - num_experts)]
        rng.shuffle(row)
        return tuple(row)

    old, new = random_placement(), random_placement()
    assert plan_layer_moves(old, new, ep_size).num_transfers > 0 or ep_size == 1
    if ep_size == 1:
        assert _move_rank(0, 1, old, new)
    else:
        assert run_on_ranks(_move_rank, ep_size, old, new) == [True] * ep_size
