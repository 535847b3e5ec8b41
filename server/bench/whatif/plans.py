"""The step plans an EP-N engine would run for a request set: the real scheduler, no ranks.

The what-if drives the engine's own Scheduler (server/core/scheduler.py) with the engine
settings the engine-mode bench uses for the same sets (experiment.engine_app), so the
sequences are dealt to DP ranks, chunked and batched exactly as the engine would do it. Each
step's RankPlans are kept as they are: the what-if's rank timers run them through a real
ModelRunner, and the routing sources read which (request, position) each token row is.

Tokens are not sampled here: every request ignores EOS and stops on length, so the plans do
not depend on token values (decode rows read their input from the device). Steps are planned
one at a time (plan, then apply), as engine.overlap=false does; with overlap the engine plans
the same rows, since a sequence whose last token is in flight is never scheduled again.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...engine.api import GenerationRequest, SamplingParams, StopParams
from ...core.scheduler import Scheduler
from ...core.sequence import Sequence
from ...worker.step_plan import RankPlan, RankResult
from ..request_sets import RequestSet


@dataclass(frozen=True)
class RankTokens:
    """Which request and position each token row of one rank's step is (batch order)."""

    request: np.ndarray  # [T] int64 index into the request set
    position: np.ndarray  # [T] int64 position of the token in its request

    @property
    def num_tokens(self) -> int:
        return len(self.request)


@dataclass(frozen=True)
class PlannedStep:
    """One forward step of the EP group: every rank's plan and token identities."""

    index: int  # forward step number within the run (0-based)
    ranks: tuple[RankPlan, ...]  # [ep] the engine's plan for each rank
    tokens: tuple[RankTokens, ...]  # [ep]

    @property
    def is_decode(self) -> bool:
        """Every rank only decodes (the engine then replays decode graphs where it can)."""
        return self.ranks[0].decode_batch is not None

    @property
    def phase(self) -> str:
        return "decode" if self.is_decode else "prefill"

    @property
    def num_tokens(self) -> int:
        return sum(t.num_tokens for t in self.tokens)

    @property
    def token_offsets(self) -> list[int]:
        return [p.token_offset for p in self.ranks]


def _rank_tokens(plan: RankPlan, running: list[Sequence], index: dict[int, int]) -> RankTokens:
    """Rows of one rank's batch -> (request index, position) per token, via slot -> sequence."""
    by_slot = {s.slot: s for s in running}
    b = plan.batch
    q = b.query_lens.astype(np.int64)
    requests = np.repeat(np.array([index[by_slot[int(s)].seq_id] for s in b.slots], dtype=np.int64), q)
    cu = np.concatenate([[0], np.cumsum(q)])
    positions = np.arange(int(q.sum()), dtype=np.int64) + np.repeat(b.start_pos - cu[:-1], q)
    return RankTokens(requests, positions)


def plan_steps(requests: RequestSet, *, ep_size: int, max_num_seqs: int, max_num_batched_tokens: int,
               kv_block_size: int, kv_cache_tokens: int, max_queue: int) -> list[PlannedStep]:
    """Every forward step of `requests` (all submitted at once) on an EP group of `ep_size`."""
    sched = Scheduler(num_ranks=ep_size, num_blocks=kv_cache_tokens // kv_block_size, block_size=kv_block_size,
                      max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_queue=max_queue)
    index: dict[int, int] = {}
    for i, prompt in enumerate(requests.prompts):
        req = GenerationRequest(str(i), tuple(prompt), SamplingParams(temperature=0.0, seed=0),
                                StopParams(max_new_tokens=requests.output_len, ignore_eos=True))
        seq = Sequence.create(i, req, 0, len(prompt) + requests.output_len, 0.0)
        index[seq.seq_id] = i
        sched.add(seq)
    steps: list[PlannedStep] = []
    while sched.has_work():
        plan = sched.plan()
        if not plan.ranks[0].run_forward:
            raise RuntimeError(f"the scheduler planned an empty step {plan.step} with work left: engine limits too small")
        tokens = tuple(_rank_tokens(p, sched.running[r], index) for r, p in enumerate(plan.ranks))
        steps.append(PlannedStep(len(steps), tuple(plan.ranks), tokens))
        results = [RankResult(plan.step, r, np.zeros(len(s), dtype=np.int64)) for r, s in enumerate(plan.sampling)]
        for seq, _, _ in sched.update(plan, results):
            if len(seq.token_ids) >= seq.max_total_len:
                sched.finish(seq)
    return steps
