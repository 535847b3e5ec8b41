"""Move expert weights between EP ranks when a layer's placement changes.

Why from peers and not from the checkpoint: every expert a rank newly needs is already in
some rank's memory, usually one NVLink hop away, while the checkpoint is on disk (slow,
maybe not on every node) and a random-weight benchmark model has no checkpoint at all.
Moving only the experts that change places keeps a rebalance to the bytes it must move.

Plan (identical on every rank, computed from the old and new placement alone, so nothing
about it needs to be communicated): each new slot takes its expert from the rank's own old
slots if it held it, else from the nearest rank after it (cyclically) that held it. Then one
all_to_all_single per layer carries the expert rows, every rank joining even when it sends
and receives nothing.

A row is every tensor of the slot (LocalExperts.slot_tensors: gate_up_proj and down_proj,
plus their float32 *_scale_inv block scales for FP8 experts) viewed as bytes and concatenated,
so one collective moves codes and scales together, and float8 tensors travel as uint8, which
gloo and NCCL all support (not every backend takes float8 dtypes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LayerMoves:
    """How one layer's slots are refilled. Local indices are positions in a rank's slots."""

    keep: list[list[tuple[int, int]]]  # [rank] (old local, new local): copies inside the rank
    send: list[list[list[int]]]  # [src][dst] old local slots src sends dst, in dst's receive order
    recv: list[list[list[int]]]  # [dst][src] new local slots dst fills from src, same order

    @property
    def num_transfers(self) -> int:
        """Expert copies crossing ranks."""
        return sum(len(x) for row in self.send for x in row)

    @property
    def num_local_copies(self) -> int:
        """Expert copies moving between slots of one rank."""
        return sum(old != new for row in self.keep for old, new in row)


def plan_layer_moves(old: list[int] | tuple[int, ...], new: list[int] | tuple[int, ...], ep_size: int) -> LayerMoves:
    s = len(new) // ep_size
    held: list[dict[int, int]] = []  # [rank] logical -> first old local slot holding it
    for r in range(ep_size):
        first: dict[int, int] = {}
        for local, e in enumerate(old[r * s:(r + 1) * s]):
            first.setdefault(e, local)
        held.append(first)
    keep: list[list[tuple[int, int]]] = [[] for _ in range(ep_size)]
    send: list[list[list[int]]] = [[[] for _ in range(ep_size)] for _ in range(ep_size)]
    recv: list[list[list[int]]] = [[[] for _ in range(ep_size)] for _ in range(ep_size)]
    for dst in range(ep_size):
        for local, e in enumerate(new[dst * s:(dst + 1) * s]):
            if e in held[dst]:
                keep[dst].append((held[dst][e], local))
                continue
            src = next((dst + d) % ep_size for d in range(1, ep_size) if e in held[(dst + d) % ep_size])
            send[src][dst].append(held[src][e])
            recv[dst][src].append(local)
    return LayerMoves(keep, send, recv)


def _slot_bytes(p: torch.Tensor, slot: int) -> torch.Tensor:
    """p[slot] ([...], contiguous) as a flat uint8 view of its storage: writes go through. Sliced
    rather than indexed, so a per-slot scalar ([S] tensors) stays 1-D and can change dtype."""
    return p[slot:slot + 1].view(torch.uint8).reshape(-1)


@torch.no_grad()
def move_layer_experts(params: list[torch.Tensor], moves: LayerMoves, rank: int, ep_size: int,
                       group: dist.ProcessGroup | None = None) -> None:
    """Rewrite `params` (this rank's [S, ...] expert tensors, LocalExperts.slot_tensors(): any
    dtypes) in place to the new placement; the tensors keep their storage, so captured CUDA
    graphs stay valid. A collective whenever any rank sends anything: every rank must call it."""
    sizes = [_slot_bytes(p, 0).numel() for p in params]  # bytes of one slot, per tensor
    recv_buf = None
    if moves.num_transfers and ep_size > 1:
        send_counts = [len(moves.send[rank][d]) for d in range(ep_size)]
        recv_counts = [len(moves.recv[rank][src]) for src in range(ep_size)]
        width = sum(sizes)
        device = params[0].device
        rows = [torch.cat([_slot_bytes(p, i) for p in params]) for d in range(ep_size) for i in moves.send[rank][d]]
        empty = torch.empty(0, width, dtype=torch.uint8, device=device)
        send_buf = torch.stack(rows) if rows else empty  # [n_send, D] bytes, read before any write
        recv_buf = torch.empty(sum(recv_counts), width, dtype=torch.uint8, device=device)  # [n_recv, D] bytes
        dist.all_to_all_single(recv_buf, send_buf, recv_counts, send_counts, group=group)
    # Inside the rank: read every source slot before writing any (a move may be a cycle).
    copies = [(o, n) for o, n in moves.keep[rank] if o != n]
    sources = {o: [p[o].clone() for p in params] for o in {o for o, _ in copies}}
    for old_local, new_local in copies:
        for p, src in zip(params, sources[old_local]):
            p[new_local].copy_(src)
    if recv_buf is not None:
        at = 0
        for src in range(ep_size):
            for local in moves.recv[rank][src]:
                offset = 0
                for p, n in zip(params, sizes):
                    _slot_bytes(p, local).copy_(recv_buf[at, offset:offset + n])
                    offset += n
                at += 1
