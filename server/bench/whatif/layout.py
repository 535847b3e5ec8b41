"""What every rank's expert kernel receives in one MoE layer of one step, under one policy.

The engine's own code computes it, one rank after the other, in this process:
  1. rank r's slice of the router output (its token rows, from the step plan's offsets);
  2. the policy under test with rank r's RoutingContext (layer, ep_rank, ep_size, token_offset),
     as MoELayer.forward calls it (all ranks' calls handed over at once: call_ranks);
  3. with EPLB, the replica map's physical slots (ReplicaMap, the token offset picks the copy);
  4. the dispatcher's rows. `allgather`: rank r sends its rows padded to the step's common row
     count R with -1 (token_rows.write_send_ids, as TokenRows.pack writes them), the all-gather
     concatenates every rank's rows in rank order (what the collective returns, by definition),
     and rank r's kernel reads local ids from them (GatherDispatcher.local_ids). `local`
     (ep_size 1): the rank's own rows, its graph's padding rows included (they are computed).

Only ids are laid out here; the hidden rows do not change a kernel's time and the timers fill
them with random values. The counts per local expert slot are what the kernel timing keys on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...moe.dispatch.all_gather import GatherDispatcher
from ...moe.dispatch.token_rows import write_send_ids
from ...moe.routing import RoutingContext, RoutingPolicy
from .plans import PlannedStep
from .sources import RouterOutput

KINDS = ("local", "allgather")


@dataclass
class LayerLayout:
    """One MoE layer of one step: every rank's expert-kernel input and the loads behind it."""

    kind: str  # local | allgather
    rows: int  # rows per rank in the exchange (allgather), or the local kernel's rows
    kernel_ids: torch.Tensor  # allgather: [ep*R, k] gathered slot ids (-1: padding); local: [R, k]
    slots_per_rank: int
    slot_counts: torch.Tensor  # [ep, slots per rank] int64 (token, slot) pairs each rank computes
    expert_counts: torch.Tensor  # [E] int64 logical (token, expert) pairs of real rows, before EPLB
    ranks_per_token: float  # mean number of EP ranks a real token's k experts live on
    _host_counts: object = None

    @property
    def ep_size(self) -> int:
        return self.slot_counts.shape[0]

    def kernel_rows(self) -> int:
        return self.kernel_ids.shape[0]

    def local_ids(self, rank: int) -> torch.Tensor:
        """[T, k] int32 ids rank `rank`'s kernel reads (-1: a slot it skips)."""
        if self.kind == "local":
            return self.kernel_ids
        per = self.slots_per_rank
        return GatherDispatcher.local_ids(self.kernel_ids, rank * per, per)

    def host_counts(self):
        """[ep, slots per rank] numpy copy of slot_counts (one device-to-host copy per layout)."""
        if self._host_counts is None:
            self._host_counts = self.slot_counts.cpu().numpy()
        return self._host_counts

    def tile_key(self, rank: int, tile_rows: int) -> tuple:
        """What rank `rank`'s kernel does: kind, rows, and the multiset of its experts' row tiles
        (ceil(pairs / tile_rows) per local slot; tile_rows 1: the exact loads)."""
        counts = self.host_counts()[rank]
        tiles = sorted(((counts + tile_rows - 1) // tile_rows).tolist(), reverse=True)
        return (self.kind, self.kernel_rows(), tuple(t for t in tiles if t))


class Layouter:
    """Lays out the MoE layers of planned steps for one policy (and EPLB placement)."""

    def __init__(self, policy: RoutingPolicy, *, num_experts: int, top_k: int, ep_size: int, kind: str,
                 replicas=None, seed: int = 0, router_groups: int = 1, router_topk_groups: int = 1) -> None:
        if kind not in KINDS:
            raise ValueError(f"the what-if lays out the dispatchers {KINDS}, not {kind!r}")
        self.policy, self.num_experts, self.top_k, self.ep_size = policy, num_experts, top_k, ep_size
        self.kind, self.replicas, self.seed = kind, replicas, seed
        self.groups = (router_groups, router_topk_groups)  # the router's group limit, as MoERuntime passes it
        self.num_slots = num_experts if replicas is None else replicas.num_slots

    def rank_ids(self, step: PlannedStep, layer: int, router: RouterOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per rank: (logical ids [n_r, k] after the policy, physical slot ids [n_r, k]). The
        ranks' calls go to the policy together (RoutingPolicy.call_ranks: each the same as its
        own call, a solver policy batches them)."""
        calls = []
        for rank, (plan, tokens) in enumerate(zip(step.ranks, step.tokens)):
            lo, n = plan.token_offset, tokens.num_tokens
            ctx = RoutingContext(layer=layer, num_experts=self.num_experts, top_k=self.top_k, ep_rank=rank,
                                 ep_size=self.ep_size, token_offset=plan.token_offset, seed=self.seed,
                                 router_groups=self.groups[0], router_topk_groups=self.groups[1])
            calls.append((router.ids[lo:lo + n], router.weights[lo:lo + n], router.scores[lo:lo + n], ctx))
        out = []
        for (ids, _), (_, _, _, ctx) in zip(self.policy.call_ranks(calls), calls):
            ids = ids.to(torch.int32)
            physical = ids if self.replicas is None else self.replicas(layer, ids, ctx.token_offset)
            out.append((ids, physical.to(torch.int32)))
        return out

    def layout(self, step: PlannedStep, layer: int, router: RouterOutput, rows: int) -> LayerLayout:
        """`rows`: the step's common MoE row count (the decode-graph bucket, else the plan's ep_rows)."""
        per_rank = self.rank_ids(step, layer, router)
        device = router.ids.device
        logical = torch.cat([ids for ids, _ in per_rank])  # [T, k] real rows
        expert_counts = torch.bincount(logical.reshape(-1).long(), minlength=self.num_experts)
        per = self.num_slots // self.ep_size
        if self.kind == "local":
            ids = per_rank[0][1]
            kernel = ids if rows <= ids.shape[0] or ids.shape[0] == 0 else ids[torch.arange(rows, device=device) % ids.shape[0]]
        else:
            kernel = torch.cat([write_send_ids(torch.empty(rows, self.top_k, dtype=torch.int32, device=device), phys)
                                for _, phys in per_rank])  # [ep*R, k]
        flat = kernel.reshape(-1).long()
        slot_counts = torch.bincount(flat[flat >= 0], minlength=self.num_slots).view(self.ep_size, per)
        owner = torch.cat([phys for _, phys in per_rank]).long() // per  # [T, k] rank of each real pair
        ranks_per_token = 0.0
        if owner.numel():
            ranked = owner.sort(dim=1).values  # [T, k]
            touched = 1 + (ranked[:, 1:] != ranked[:, :-1]).sum(1)  # [T] distinct ranks per token
            ranks_per_token = float(touched.float().mean())
        return LayerLayout(self.kind, rows, kernel, per, slot_counts, expert_counts, ranks_per_token)
