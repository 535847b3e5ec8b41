"""EP-rank side of the FP8-wire dispatch test: the fixed-capacity dispatcher with bf16 rows and
with fp8 rows over this rank's expert shard, against the local path over all experts, and the
bytes each wire really handed the all-gather."""
from __future__ import annotations

import torch

from server.moe.dispatch import GatherDispatcher, LocalDispatcher
from server.moe.experts import LocalExperts

HIDDEN, INTER, TOP_K, ROWS = 256, 32, 3, 12  # HIDDEN: two 128-channel scale groups


class CountingGather(GatherDispatcher):
    """GatherDispatcher that records the bytes of every packed buffer it all-gathers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[int] = []

    def gather_rows(self, send: torch.Tensor, layout) -> torch.Tensor:
        self.sent.append(send.numel() * send.element_size())
        return super().gather_rows(send, layout)


def experts(num_experts: int, dtype: torch.dtype, rank: int = 0, ep: int = 1) -> LocalExperts:
    """Experts [rank*E/ep, (rank+1)*E/ep) of one seeded set (all of them at ep 1)."""
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=g) / HIDDEN ** 0.5
    down = torch.randn(num_experts, HIDDEN, INTER, generator=g) / INTER ** 0.5
    per = num_experts // ep
    part = LocalExperts(per, HIDDEN, INTER, "silu", first_expert=rank * per, dtype=dtype)
    with torch.no_grad():
        part.gate_up_proj.copy_(gate_up[rank * per:(rank + 1) * per])
        part.down_proj.copy_(down[rank * per:(rank + 1) * per])
    return part


def inputs(rank: int, num_experts: int, dtype: torch.dtype):
    """x [N, H] with uneven N per rank (rank 1: none); the first row ~1e4 times larger than the
    rest, the last row's second 128-channel group all zero. ids [N, k] int32, weights [N, k]."""
    n = [5, 0, 11, 7][rank % 4]
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, HIDDEN, generator=g)
    if n:
        x[0] *= 1e4
        x[-1, 128:] = 0
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:TOP_K] for _ in range(n)]) if n else \
        torch.zeros(0, TOP_K, dtype=torch.int64)
    return x.to(dtype), ids.to(torch.int32), torch.rand(n, TOP_K, generator=g)


def row_errors(got: torch.Tensor, want: torch.Tensor) -> list[float]:
    """Per token ||got - want|| / ||want||."""
    got, want = got.float(), want.float()
    return ((got - want).norm(dim=1) / want.norm(dim=1)).tolist()


def wire_rank(rank: int, ep: int) -> dict:
    """-> per activation dtype: bf16-wire error vs local, fp8-wire per-token errors vs the
    bf16 wire, and the bytes each wire all-gathered (one call each, ROWS rows)."""
    num_experts = 4 * ep
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        full, mine = experts(num_experts, dtype), experts(num_experts, dtype, rank, ep)
        x, ids, weights = inputs(rank, num_experts, dtype)
        bf16, fp8 = (CountingGather(rank, ep, num_experts, wire=w) for w in ("bf16", "fp8"))
        with torch.no_grad():
            want = LocalDispatcher()(x, ids, weights, full)
            got_bf16 = bf16(x, ids, weights, mine, rows=ROWS)
            got_fp8 = fp8(x, ids, weights, mine, rows=ROWS)
        out[str(dtype)] = {"bf16_vs_local": row_errors(got_bf16, want), "fp8_vs_bf16": row_errors(got_fp8, got_bf16),
                           "bytes": {"bf16": bf16.sent, "fp8": fp8.sent}, "finite": bool(got_fp8.isfinite().all())}
    return out
