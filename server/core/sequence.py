"""One request as the scheduler sees it: its tokens, how many are in the KV cache, where.

A Sequence lives only on rank 0 (the scheduler's process). Worker ranks never see it: the
step plan carries what a rank needs for one step (tokens, positions, and the slot updates:
block-table appends, sampling parameters of admitted sequences), so workers hold no
per-request state beyond their slot table, and preemption or cancellation needs no message.

Overlapped steps: the scheduler plans step n+1 before step n's tokens are known. A sequence
then has `num_pending` tokens on their way; `num_computed` advances when a step is planned.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..engine.api import GenerationRequest, RoutedExpertsMode


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # in the queue: no rank, no KV blocks
    RUNNING = "running"  # owns a rank and KV blocks on it
    FINISHED = "finished"  # done or cancelled; blocks returned


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: GenerationRequest
    seed: int  # the request's seed, or one drawn on rank 0 at admission
    max_total_len: int  # prompt + generated tokens can never exceed this (max_new_tokens, max_model_len)
    arrival_time: float  # time.monotonic() at submission
    token_ids: list[int] = field(default_factory=list)  # prompt + generated so far
    num_prompt_tokens: int = 0
    num_computed: int = 0  # leading tokens whose K/V are in (or being written to) this sequence's blocks
    num_pending: int = 0  # tokens sampled by a step still in flight, not yet in token_ids (0 or 1)
    rank: int = -1  # EP rank owning the sequence's attention and KV cache (-1: none)
    slot: int = -1  # this sequence's row in its rank's slot table (-1: none)
    block_table: list[int] = field(default_factory=list)  # KV block ids on `rank`
    status: SeqStatus = SeqStatus.WAITING
    admit_order: int = -1  # increasing per admission; preemption picks the newest
    num_preemptions: int = 0
    first_token_time: float | None = None
    #: routed experts asked for: the first position whose rows are still to be returned (-1: not
    #: asked for). Advanced when a step is planned, so a recomputed (preempted) prefix is not sent twice.
    routed_from: int = -1
    routed_pending: list = field(default_factory=list)  # [rows, MoE layers, k] int16 arrays not yet sent
    #: prompt logprobs asked for: the first prompt position whose next token's logprob is still to
    #: be computed (-1: not asked for); like routed_from, a recomputed prefix is not sent twice
    prompt_lp_from: int = -1
    prompt_lp_pending: list = field(default_factory=list)  # [P] float32 arrays not yet sent
    #: with top_logprobs too: ([P, N] ids, [P, N] logprobs) of the prompt positions, not yet sent
    prompt_top_pending: list = field(default_factory=list)
    #: n > 1: while waiting to fork, the sequence whose first `shared_len` prompt tokens' KV
    #: blocks this one will share (None: an ordinary sequence)
    parent: "Sequence | None" = None
    shared_len: int = 0
    #: the slot of the parent on this sequence's rank when it forked (its penalty prompt set is copied); -1: none
    forked_from_slot: int = -1
    #: top_logprobs asked for: (ids, logprobs) of the newest token's position, set by Scheduler.update
    last_top: tuple[list[int], list[float]] | None = None

    @classmethod
    def create(cls, seq_id: int, request: GenerationRequest, seed: int, max_total_len: int, now: float) -> "Sequence":
        mode = getattr(request, "routed_experts", RoutedExpertsMode.NONE)
        prompt = len(request.prompt_token_ids)
        routed_from = {RoutedExpertsMode.NONE: -1, RoutedExpertsMode.GENERATED: prompt - 1,
                       RoutedExpertsMode.WITH_PROMPT: 0}[mode]
        return cls(
            routed_from=routed_from,
            prompt_lp_from=0 if getattr(request, "prompt_logprobs", False) else -1,
            seq_id=seq_id,
            request=request,
            seed=seed,
            max_total_len=max_total_len,
            arrival_time=now,
            token_ids=list(request.prompt_token_ids),
            num_prompt_tokens=len(request.prompt_token_ids),
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def total_len(self) -> int:
        """Tokens known plus tokens on their way (sampled in a step still in flight)."""
        return len(self.token_ids) + self.num_pending

    @property
    def last_token_in_flight(self) -> bool:
        """The token on its way is this sequence's last by length: nothing more to schedule."""
        return self.num_pending > 0 and self.total_len >= self.max_total_len

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.total_len - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """One token to run (the last sampled one, or a one-token prompt): a decode step,
        which does not draw on the per-step prefill token budget."""
        return self.num_uncomputed == 1

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
