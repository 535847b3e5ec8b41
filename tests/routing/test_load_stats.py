"""Expert-load counters: device-side, graph-safe updates; reduction on demand."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from server.moe.load_stats import ExpertLoadCounters


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
