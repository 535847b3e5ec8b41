"""What rank 0 sends every rank for one engine step, and what each rank sends back.

Plain picklable data: it travels over the gloo control group (scatter_object_list /
gather_object). A rank's batch is a handful of numpy arrays, not one object per sequence, so
building, pickling and reading a plan cost per batch rather than per sequence in Python.

Each running sequence owns a *slot* on its rank (0 <= slot < max_num_seqs). A rank keeps, per
slot, the sequence's block table, its sampling parameters and the last token it sampled (on
the device: the next decode step reads its input there, never through the host). The plan
carries only what changed: slots (re)filled by admissions, blocks appended, and this step's
rows. Slot updates are applied in plan order before the step runs, so a slot reused while
an older step is still in flight never mixes two sequences' state: ranks run steps in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..moe.load_stats import ExpertLoadSnapshot


#: the most token ids a request's min_tokens can hold back (EOS ids + stop_token_ids)
MAX_BANNED_IDS = 80


@dataclass(frozen=True)
class SampleSpec:
    """How to draw the token that follows a sequence's last token."""

    temperature: float
    top_p: float
    top_k: int
    seed: int
    logprobs: bool


def _i32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def _i64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


@dataclass(frozen=True)
class SlotFill:
    """Slots (re)filled this step by admitted sequences: their sampling parameters.
    The slot's block-table row is cleared; its blocks arrive as BlockAppends."""

    slots: np.ndarray  # [A] int32
    temperature: np.ndarray  # [A] float32, 0 = greedy
    top_p: np.ndarray  # [A] float32
    top_k: np.ndarray  # [A] int32, 0 = no cut
    seed_keys: np.ndarray  # [A] int64: sampler key of the request's seed (sampler.seed_key)
    logprobs: np.ndarray  # [A] bool
    min_p: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [A] float32, 0 = no cut
    repetition: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [A] float32, 1 = off
    presence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [A] float32, 0 = off
    frequency: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [A] float32, 0 = off
    prompt_lens: np.ndarray = field(default_factory=lambda: _i64([]))  # [A] int64 prompt tokens of the request
    min_tokens: np.ndarray = field(default_factory=lambda: _i64([]))  # [A] int64, 0 = off
    top_logprobs: np.ndarray = field(default_factory=lambda: _i32([]))  # [A] int32 alternatives asked for
    #: [A] int32 the slot (same rank) of the sequence whose prompt blocks this one shares (n > 1;
    #: its penalty prompt set is copied: the shared prompt tokens never run in this slot); -1: none
    prompt_from: np.ndarray = field(default_factory=lambda: _i32([]))
    #: the fills with min_tokens > 0: their slots [M] int32 and the ids banned until then,
    #: [M, MAX_BANNED_IDS] int64 (EOS unless ignore_eos, and stop_token_ids; padded by repeating the first)
    ban_slots: np.ndarray = field(default_factory=lambda: _i32([]))
    banned: np.ndarray = field(default_factory=lambda: np.zeros((0, MAX_BANNED_IDS), np.int64))

    @classmethod
    def empty(cls) -> "SlotFill":
        """The shared empty update (never mutated: most steps admit nothing)."""
        return _NO_FILLS

    def __len__(self) -> int:
        return len(self.slots)


@dataclass(frozen=True)
class BlockAppends:
    """KV blocks that join slots' block tables this step: table[slot, col] = block."""

    slots: np.ndarray  # [U] int32
    cols: np.ndarray  # [U] int32
    blocks: np.ndarray  # [U] int32

    @classmethod
    def empty(cls) -> "BlockAppends":
        """The shared empty update (never mutated)."""
        return _NO_APPENDS

    def __len__(self) -> int:
        return len(self.slots)


_NO_FILLS = SlotFill(_i32([]), np.zeros(0, np.float32), np.zeros(0, np.float32), _i32([]), _i64([]), np.zeros(0, bool))
_NO_APPENDS = BlockAppends(_i32([]), _i32([]), _i32([]))


@dataclass(frozen=True)
class RankBatch:
    """One rank's rows for one step, in batch order (attention is data-parallel)."""

    slots: np.ndarray  # [S] int32 slot of each sequence
    query_lens: np.ndarray  # [S] int32 new tokens (prompt chunk, or 1 to decode)
    start_pos: np.ndarray  # [S] int64 position of the first new token = tokens already in the KV cache
    from_device: np.ndarray  # [S] bool: the (single) new token is the one this slot sampled last step
    samples: np.ndarray  # [S] bool: a token is drawn after this row (False: a prompt chunk that is not the last)
    tokens: np.ndarray  # [sum(query_lens[~from_device])] int64 the other rows' new tokens, concatenated
    fills: SlotFill = field(default_factory=SlotFill.empty)
    appends: BlockAppends = field(default_factory=BlockAppends.empty)
    #: [R] int64 token rows (into this step's T) whose routed experts the rank sends back
    #: (requests that asked for them); empty: the forward records nothing
    routed_rows: np.ndarray = field(default_factory=lambda: _i64([]))
    #: prompt logprobs: [P] int64 token rows (into this step's T) whose next prompt token's
    #: logprob comes back, and [P] int64 those next tokens; empty: nobody asked this step
    prompt_lp_rows: np.ndarray = field(default_factory=lambda: _i64([]))
    prompt_lp_targets: np.ndarray = field(default_factory=lambda: _i64([]))

    @classmethod
    def empty(cls) -> "RankBatch":
        z = _i32([])
        return cls(z, z, _i64([]), np.zeros(0, bool), np.zeros(0, bool), _i64([]))

    @property
    def num_seqs(self) -> int:
        return len(self.slots)

    @property
    def num_tokens(self) -> int:
        return int(self.query_lens.sum())

    @property
    def context_lens(self) -> np.ndarray:
        """[S] int64 tokens in the KV cache after this step."""
        return self.start_pos + self.query_lens


@dataclass(frozen=True)
class RankPlan:
    """One rank's orders for one step."""

    step: int
    batch: RankBatch
    token_offset: int  # sum of the token counts of lower ranks in this step (RoutingContext)
    run_forward: bool  # some rank has tokens: every rank runs the model (collectives)
    load_snapshot: bool | None = None  # not None: join the expert-load collective; value = reset
    stop: bool = False  # leave the worker loop
    rebalance: bool = False  # EPLB: after the forward, re-place experts from the live counters (collective)
    #: not None: before this step's forward, switch the rank's routing policy to the one this
    #: routing.* mapping names ({"name": ..., **params}); every rank gets it in the same step
    routing: dict[str, Any] | None = None
    ep_rows: int = 0  # the most tokens any rank has this step: every rank's MoE layers pad to it (EP dispatch)
    decode_batch: int | None = None  # every rank only decodes: the most sequences on any rank (all replay
    # the decode-graph bucket that holds it, in lockstep); None: some rank runs a prompt chunk
    #: not None: run this start-up warm-up (server/worker/warmup.py, a WarmupPlan) before anything else
    warmup: Any = None

    @classmethod
    def stop_plan(cls) -> "RankPlan":
        return cls(step=-1, batch=RankBatch.empty(), token_offset=0, run_forward=False, stop=True)


@dataclass
class RankResult:
    """A rank's sampled tokens, one per row of its batch that samples, in batch order."""

    step: int
    rank: int
    tokens: np.ndarray = field(default_factory=lambda: _i64([]))  # [R] int64
    logprobs: np.ndarray | None = None  # [R] float32 (raw log-softmax) when some row asked for them
    load: ExpertLoadSnapshot | None = None  # the reduced counters (every rank gets the same sum)
    rebalance: Any = None  # RebalanceReport (server/moe/eplb/rebalance.py) when the plan asked for one
    routing: str | None = None  # repr of the policy the rank runs, when the plan switched it
    routed: np.ndarray | None = None  # [R, MoE layers, k] int16 logical expert ids of batch.routed_rows
    warmup_s: float | None = None  # seconds the plan's warm-up took on this rank
    #: [R, K] int64 / float32: the K most likely tokens of each sampled row's raw distribution
    #: and their logprobs (K = min(MAX_TOP_LOGPROBS, V)), when some row asked for top_logprobs
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    prompt_logprobs: np.ndarray | None = None  # [P] float32 for batch.prompt_lp_rows
    prompt_top_ids: np.ndarray | None = None  # [P, K] int64: each prompt row's K most likely next tokens
    prompt_top_logprobs: np.ndarray | None = None  # [P, K] float32: their logprobs


@dataclass
class StepPlan:
    """All ranks' plans for one step (rank 0 only). `sampling[r]` lists rank r's sequences
    whose rows sample, in the order of that rank's result tokens; it stays on rank 0."""

    step: int
    ranks: list[RankPlan]
    sampling: list[list] = field(default_factory=list)  # [rank][row] Sequence
    #: [rank] (Sequence, rows) owning that rank's RankResult.routed rows, in order; stays on rank 0
    routed: list[list] = field(default_factory=list)
    #: [rank] (Sequence, rows) owning that rank's RankResult.prompt_logprobs, in order; stays on rank 0
    prompt_lp: list[list] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(p.batch.num_tokens for p in self.ranks)

    @property
    def is_idle(self) -> bool:
        return not any(p.run_forward or p.load_snapshot is not None or p.stop or p.rebalance or p.routing is not None
                       or p.warmup is not None for p in self.ranks)

    def with_rebalance(self) -> "StepPlan":
        """The same step with every rank also joining an EPLB rebalance after its forward."""
        return StepPlan(self.step, [replace(p, rebalance=True) for p in self.ranks], self.sampling, self.routed,
                        self.prompt_lp)

    def with_routing(self, routing: dict[str, Any]) -> "StepPlan":
        """The same step with every rank first switching to the routing policy `routing` names."""
        return StepPlan(self.step, [replace(p, routing=dict(routing)) for p in self.ranks], self.sampling, self.routed,
                        self.prompt_lp)


def build_step_plan(step: int, batches: list[RankBatch], sampling: list[list] | None = None,
                    load_snapshot: bool | None = None, stop: bool = False, routed: list[list] | None = None,
                    prompt_lp: list[list] | None = None) -> StepPlan:
    """Per-rank batches -> per-rank plans with token offsets (rank r starts after ranks < r)."""
    counts = [b.num_tokens for b in batches]
    run_forward = sum(counts) > 0
    ep_rows = max(counts, default=0)
    decoding = all(bool((b.query_lens == 1).all()) for b in batches)
    decode_batch = max(b.num_seqs for b in batches) if run_forward and decoding else None
    plans, offset = [], 0
    for b, n in zip(batches, counts):
        plans.append(RankPlan(step, b, offset, run_forward, load_snapshot, stop, ep_rows=ep_rows,
                              decode_batch=decode_batch))
        offset += n
    return StepPlan(step, plans, sampling if sampling is not None else [[] for _ in batches],
                    routed if routed is not None else [[] for _ in batches],
                    prompt_lp if prompt_lp is not None else [[] for _ in batches])
