"""Expert-load counters: device-side, graph-safe updates; reduction on demand."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from server.moe.load_stats import ExpertLoadCounters, aggregate_layers, balancedness


def test_counts_and_summary() -> None:
    c = ExpertLoadCounters(num_layers=2, num_experts=8, ep_size=4)
    ids = torch.tensor([[0, 1], [0, 2], [6, 7]], dtype=torch.int32)  # ranks: {0}, {0,1}, {3}
    c.record(0, ids)
    snap = c.snapshot()
    assert snap.expert_tokens[0] == [2, 1, 1, 0, 0, 0, 1, 1]
    assert snap.expert_tokens[1] == [0] * 8
    assert snap.tokens == [3, 0] and snap.ranks_touched == [4, 0]
    assert snap.rank_tokens()[0] == [3, 1, 0, 2]
    assert snap.expert_max_over_mean()[0] == pytest.approx(2 / (6 / 8))
    assert snap.rank_max_over_mean()[0] == pytest.approx(3 / (6 / 4))
    assert snap.mean_ranks_per_token()[0] == pytest.approx(4 / 3)


def test_valid_mask_skips_padding_rows() -> None:
    c = ExpertLoadCounters(num_layers=1, num_experts=4)
    ids = torch.tensor([[0, 1], [2, 3], [0, 1]], dtype=torch.int32)
    c.record(0, ids, valid=torch.tensor([True, True, False]))
    snap = c.snapshot()
    assert snap.expert_tokens[0] == [1, 1, 1, 1] and snap.tokens == [2]


def test_empty_batch_and_reset() -> None:
    c = ExpertLoadCounters(num_layers=1, num_experts=4, ep_size=2)
    c.record(0, torch.zeros(0, 2, dtype=torch.int32))
    c.record(0, torch.tensor([[1, 3]], dtype=torch.int32))
    assert c.snapshot(reset=True).tokens == [1]
    assert c.snapshot().tokens == [0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    c = ExpertLoadCounters(num_layers=1, num_experts=4, ep_size=world)
    c.record(0, torch.tensor([[rank, 3]] * (rank + 1), dtype=torch.int32))
    snap = c.snapshot(group=dist.group.WORLD)
    results.put((rank, snap.expert_tokens[0], snap.tokens[0]))
    dist.destroy_process_group()


def test_snapshot_sums_over_ranks() -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    # rank 0: 1 token -> experts {0, 3}; rank 1: 2 tokens -> experts {1, 3}
    assert got == [(0, [1, 2, 0, 3], 3), (1, [1, 2, 0, 3], 3)]


def test_balancedness_reduces_over_ranks_within_each_layer() -> None:
    # Every layer uneven in the same way: rank 0 computes 3x what rank 1 does. Reduced over the
    # wrong axis (per rank over layers, then over ranks) this reads 1.0; over ranks it reads 2/3.
    loads = [[30, 10], [30, 10], [30, 10]]  # [layer][rank]
    assert balancedness(loads) == pytest.approx([2 / 3] * 3)
    agg = aggregate_layers(balancedness(loads))
    assert agg == pytest.approx({"min": 2 / 3, "p50": 2 / 3, "p90": 2 / 3, "avg": 2 / 3})
    assert balancedness([[5, 5, 5, 5]]) == [1.0]
    assert balancedness([[8, 0, 0, 0]]) == [0.25]  # one unit of four did everything
    assert balancedness([[0, 0]]) == [None]  # an idle layer has no balance


def test_layer_aggregate_percentiles_and_idle_layers() -> None:
    values = [0.5, None, 1.0, 0.7, 0.9, 0.6]
    agg = aggregate_layers(values)
    assert agg["min"] == 0.5 and agg["avg"] == pytest.approx(3.7 / 5)
    assert agg["p50"] == pytest.approx(0.7) and agg["p90"] == pytest.approx(0.9 + 0.6 * 0.1)
    assert aggregate_layers([None, None]) == {"min": None, "p50": None, "p90": None, "avg": None}


def test_snapshot_balancedness_per_rank_and_per_expert() -> None:
    c = ExpertLoadCounters(num_layers=2, num_experts=4, ep_size=2)
    for layer in range(2):  # the same skew in both layers: experts 0, 1 (rank 0) get 3 of 4 picks
        c.record(layer, torch.tensor([[0, 1], [0, 2], [1, 0], [3, 1]], dtype=torch.int32))
    bal = c.snapshot().balancedness()
    assert bal["rank"]["avg"] == pytest.approx((8 / 2) / 6) and bal["rank"]["min"] == bal["rank"]["p90"]
    assert bal["expert"]["avg"] == pytest.approx((8 / 4) / 3)
