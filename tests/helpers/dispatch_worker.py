"""EP-rank side of the dispatch tests: AllToAllDispatcher over this rank's expert shard vs
LocalDispatcher over all experts, for inputs that every rank can rebuild from a seed."""
from __future__ import annotations

import torch

from server.moe.dispatch import AllToAllDispatcher, LocalDispatcher
from server.moe.experts import LocalExperts

HIDDEN, INTER, TOP_K = 16, 8, 3


def full_experts(num_experts: int, seed: int = 0) -> LocalExperts:
    g = torch.Generator().manual_seed(seed)
    experts = LocalExperts(num_experts, HIDDEN, INTER, "silu")
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g))
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g))
    return experts


def shard(full: LocalExperts, rank: int, ep: int) -> LocalExperts:
    per = full.num_local // ep
    part = LocalExperts(per, HIDDEN, INTER, "silu", first_expert=rank * per)
    with torch.no_grad():
        part.gate_up_proj.copy_(full.gate_up_proj[rank * per:(rank + 1) * per])
        part.down_proj.copy_(full.down_proj[rank * per:(rank + 1) * per])
    return part


def make_inputs(case: str, rank: int, ep: int, num_experts: int):
    """-> x [N, H], ids [N, k] int32 (distinct per token), weights [N, k]."""
    g = torch.Generator().manual_seed(1000 * rank + len(case))
    n = {"uneven": [5, 0, 11][rank % 3], "one_rank_hot": 7, "empty": 0, "single": 1 if rank == 0 else 0}[case]
    x = torch.randn(n, HIDDEN, generator=g)
    if case == "one_rank_hot":  # every pair goes to the last rank's experts
        per = num_experts // ep
        ids = torch.stack([torch.randperm(per, generator=g)[:TOP_K] for _ in range(n)]) + (ep - 1) * per
    else:
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:TOP_K] for _ in range(n)]) if n else torch.zeros(0, TOP_K, dtype=torch.int64)
    weights = torch.rand(n, TOP_K, generator=g)
    return x, ids.to(torch.int32), weights


def dispatch_rank(rank: int, ep: int, num_experts: int, cases: list[str]) -> dict[str, float]:
    """-> {case: max |a2a - local| / max |local|} on this rank."""
    full = full_experts(num_experts)
    mine = shard(full, rank, ep)
    a2a = AllToAllDispatcher(rank, ep, num_experts)
    errors = {}
    for case in cases:
        x, ids, weights = make_inputs(case, rank, ep, num_experts)
        got = a2a(x, ids, weights, mine)
        want = LocalDispatcher()(x, ids, weights, full)
        assert got.shape == x.shape
        # relative: N(0, 1) weights give outputs in the hundreds, and row grouping changes matmul order
        errors[case] = ((got - want).abs().max() / want.abs().max()).item() if x.shape[0] else 0.0
    return errors
