"""What rank 0 sends every rank for one engine step, and what each rank sends back.

Plain picklable dataclasses: they travel over the gloo control group
(scatter_object_list / gather_object). A plan is self-contained — tokens, positions, block
table and sampling parameters of each of the rank's sequences — so worker ranks keep no
per-request state.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..moe.load_stats import ExpertLoadSnapshot


@dataclass(frozen=True)
class SampleSpec:
    """How to draw the token that follows a sequence's last token in this step."""

    temperature: float
    top_p: float
    top_k: int
    seed: int
    logprobs: bool


@dataclass(frozen=True)
class SeqWork:
    """One sequence's share of a step on its rank."""

    seq_id: int
    token_ids: list[int]  # the new tokens (a prompt chunk, or the last sampled token)
    start_pos: int  # position of token_ids[0]; equals the tokens already in the KV cache
    block_table: list[int]  # KV blocks holding positions [0, start_pos + len(token_ids))
    sample: SampleSpec | None  # None: a prompt chunk that is not the last one

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class RankPlan:
    """One rank's orders for one step."""

    step: int
    work: list[SeqWork]
    token_offset: int  # sum of the token counts of lower ranks in this step (RoutingContext)
    run_forward: bool  # some rank has tokens: every rank runs the model (collectives)
    load_snapshot: bool | None = None  # not None: join the expert-load collective; value = reset
    stop: bool = False  # leave the worker loop
    rebalance: bool = False  # EPLB: after the forward, re-place experts from the live counters (collective)


@dataclass
class RankResult:
    step: int
    rank: int
    sampled: list[tuple[int, int, float | None]] = field(default_factory=list)  # (seq_id, token, logprob)
    load: ExpertLoadSnapshot | None = None  # the reduced counters (every rank gets the same sum)
    rebalance: Any = None  # RebalanceReport (server/moe/eplb/rebalance.py) when the plan asked for one


@dataclass
class StepPlan:
    """All ranks' plans for one step (rank 0 only)."""

    step: int
    ranks: list[RankPlan]

    @property
    def num_tokens(self) -> int:
        return sum(w.num_tokens for p in self.ranks for w in p.work)

    @property
    def is_idle(self) -> bool:
        return not any(p.run_forward or p.load_snapshot is not None or p.stop or p.rebalance for p in self.ranks)

    def with_rebalance(self) -> "StepPlan":
        """The same step with every rank also joining an EPLB rebalance after its forward."""
        return StepPlan(self.step, [replace(p, rebalance=True) for p in self.ranks])


def build_step_plan(step: int, work: list[list[SeqWork]], load_snapshot: bool | None = None, stop: bool = False) -> StepPlan:
    """Per-rank work lists -> per-rank plans with token offsets (rank r starts after ranks < r)."""
    counts = [sum(w.num_tokens for w in ws) for ws in work]
    run_forward = sum(counts) > 0
    plans, offset = [], 0
    for ws, n in zip(work, counts):
        plans.append(RankPlan(step, ws, offset, run_forward, load_snapshot, stop))
        offset += n
    return StepPlan(step, plans)
