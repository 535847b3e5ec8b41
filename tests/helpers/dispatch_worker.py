"""EP-rank side of the dispatch tests: an EP dispatcher (variable-split all-to-all or the
fixed-capacity all-gather) over this rank's expert shard vs LocalDispatcher over all experts,
for inputs that every rank can rebuild from a seed."""
from __future__ import annotations

import torch

from server.moe.dispatch import AllToAllDispatcher, GatherDispatcher, LocalDispatcher
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
    n = {"uneven": [5, 0, 11][rank % 3], "one_rank_hot": 7, "empty": 0, "single": 1 if rank == 0 else 0,
         "all_to_rank0": 6}[case]
    x = torch.randn(n, HIDDEN, generator=g)
    per = num_experts // ep
    if case == "one_rank_hot":  # every pair goes to the last rank's experts
        ids = torch.stack([torch.randperm(per, generator=g)[:TOP_K] for _ in range(n)]) + (ep - 1) * per
    elif case == "all_to_rank0":  # the worst case: all k slots of every token of every rank on rank 0
        ids = torch.stack([torch.randperm(per, generator=g)[:TOP_K] for _ in range(n)])
    else:
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:TOP_K] for _ in range(n)]) if n else torch.zeros(0, TOP_K, dtype=torch.int64)
    weights = torch.rand(n, TOP_K, generator=g)
    return x, ids.to(torch.int32), weights


DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": GatherDispatcher}


def dispatch_rank(rank: int, ep: int, num_experts: int, cases: list[str], dispatcher: str = "alltoall",
                  rows: int | None = None) -> dict[str, float]:
    """-> {case: max |ep - local| / max |local|} on this rank. `rows`: the common row count
    passed to every call (None: the dispatcher agrees on it)."""
    full = full_experts(num_experts)
    mine = shard(full, rank, ep)
    ep_dispatch = DISPATCHERS[dispatcher](rank, ep, num_experts)
    errors = {}
    for case in cases:
        x, ids, weights = make_inputs(case, rank, ep, num_experts)
        got = ep_dispatch(x, ids, weights, mine, rows=rows)
        want = LocalDispatcher()(x, ids, weights, full)
        assert got.shape == x.shape
        # relative: N(0, 1) weights give outputs in the hundreds, and row grouping changes matmul order
        errors[case] = ((got - want).abs().max() / want.abs().max()).item() if x.shape[0] else 0.0
    return errors


def padded_rank(rank: int, ep: int, num_experts: int) -> dict[str, float]:
    """The fixed-capacity dispatcher with graph-style padding: 4 real rows of 8 on every rank,
    padding rows routed to this rank's experts (they must not be computed, nor change the real
    rows) -> {"err": max relative error of the real rows, "padding_out": max |padding rows|}."""
    full = full_experts(num_experts)
    mine = shard(full, rank, ep)
    x, ids, weights = make_inputs("all_to_rank0", rank, ep, num_experts)  # 6 rows
    valid = torch.tensor([True, False, True, True, False, True])
    got = GatherDispatcher(rank, ep, num_experts)(x, ids, weights, mine, valid=valid, rows=8)
    want = LocalDispatcher()(x[valid], ids[valid], weights[valid], full)
    return {"err": ((got[valid] - want).abs().max() / want.abs().max()).item(),
            "padding_out": got[~valid].abs().max().item()}


def gather_checks(rank: int, ep: int, cases: list[str]) -> dict[str, float]:
    """Every fixed-capacity check of one EP size in one set of ranks (spawning is slow):
    {"<case>": error with agreed rows (12 experts), "worst/<case>": error with rows=16 (4 experts
    per rank), "padded": real-row error with padding, "padding_out": max |padding rows|}."""
    out = dispatch_rank(rank, ep, 12, cases, "allgather")
    for case, err in dispatch_rank(rank, ep, 4 * ep, ["all_to_rank0", "uneven"], "allgather", rows=16).items():
        out[f"worst/{case}"] = err
    if ep > 1:
        padded = padded_rank(rank, ep, 4 * ep)
        out["padded"], out["padding_out"] = padded["err"], padded["padding_out"]
    return out
