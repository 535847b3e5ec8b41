"""The one scheduler (rank 0): queue, rank assignment, KV blocks, continuous batching.

Every step it decides, for every EP rank, which sequences run and how many tokens each:
  * running sequences first, oldest first: a decoding one runs its one token, a prefilling
    one a chunk of its prompt under `max_num_batched_tokens` (per rank, prefill tokens only);
  * then waiting requests join the running batch (continuous batching), first come first
    served, each on the least-loaded rank that has room (most free KV blocks, then fewest
    running sequences), up to `max_num_seqs` per rank.

KV memory policy: blocks are allocated lazily — the whole current prompt on admission, then
one block whenever a decoding sequence crosses a block boundary. When a rank runs out, its
newest running sequence is preempted: its blocks are freed and it goes back to the front of
the queue with its tokens so far, to be recomputed as one longer prompt (sampling is keyed by
(seed, position), so its output does not change). A request that could not fit in a rank's
cache even alone is refused at submission, so every admitted request can always finish.
"""
from __future__ import annotations

from collections import deque

from .api import ResourceExhaustedError
from .block_manager import BlockManager, blocks_for
from .sequence import Sequence, SeqStatus
from .step_plan import SampleSpec, SeqWork, StepPlan, build_step_plan


class Scheduler:
    def __init__(
        self,
        *,
        num_ranks: int,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_queue: int,
    ) -> None:
        self.num_ranks = num_ranks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_queue = max_queue
        self.blocks = [BlockManager(num_blocks, block_size) for _ in range(num_ranks)]
        self.running: list[list[Sequence]] = [[] for _ in range(num_ranks)]
        self.waiting: deque[Sequence] = deque()
        self.seqs: dict[int, Sequence] = {}
        self.step = 0
        self.num_preemptions = 0
        self._admit_counter = 0
        # Keep a little headroom on admission so a fresh batch does not preempt at once.
        self._watermark = max(1, num_blocks // 100)

    # ---- capacity -------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        """KV tokens one rank holds; a sequence never spans ranks."""
        return self.blocks[0].capacity_tokens

    def check_fits(self, max_total_len: int) -> None:
        """Refuse what can never run: the last sampled token is never cached, hence the -1."""
        if max_total_len - 1 > self.capacity_tokens:
            raise ResourceExhaustedError(
                f"request needs up to {max_total_len - 1} KV-cache tokens (prompt + max_new_tokens, capped by "
                f"max_model_len) but one rank holds {self.capacity_tokens} (engine.kv_cache_tokens)"
            )

    # ---- queue ----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence, or refuse it (the queue is bounded, the cache finite)."""
        self.check_fits(seq.max_total_len)
        if len(self.waiting) >= self.max_queue:
            raise ResourceExhaustedError(f"request queue is full ({self.max_queue} waiting; engine.max_queue)")
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self.seqs[seq.seq_id] = seq

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and return its KV blocks at once (idempotent)."""
        if self.seqs.pop(seq.seq_id, None) is None:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running[seq.rank].remove(seq)
            self._release(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting) or any(self.running)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> list[list[SeqWork]]:
        """This step's work, per rank. Mutates block tables (allocation, preemption)."""
        work: list[list[SeqWork]] = [[] for _ in range(self.num_ranks)]
        budget = [self.max_num_batched_tokens] * self.num_ranks
        preempted = False
        for r in range(self.num_ranks):
            i = 0
            while i < len(self.running[r]):
                seq = self.running[r][i]
                if seq.is_decoding:
                    if not self._ensure_blocks(seq, len(seq)):
                        preempted = True  # `seq` itself went back to the queue
                        continue
                    work[r].append(self._work(seq, 1))
                elif budget[r] > 0:
                    n = min(seq.num_uncomputed, budget[r])
                    budget[r] -= n
                    work[r].append(self._work(seq, n))
                i += 1
        if not preempted:
            for seq in self._admit():
                r = seq.rank
                n = 1 if seq.is_decoding else min(seq.num_uncomputed, budget[r])
                if not seq.is_decoding:
                    budget[r] -= n
                if n > 0:
                    work[r].append(self._work(seq, n))
        self.step += 1
        return work

    def plan(self, load_snapshot: bool | None = None, stop: bool = False) -> StepPlan:
        return build_step_plan(self.step, self.schedule(), load_snapshot, stop)

    def update(self, plan: StepPlan, sampled: dict[int, tuple[int, float | None]]) -> list[tuple[Sequence, int, float | None]]:
        """Apply a finished step: advance cached-token counts and append sampled tokens.

        Sequences cancelled while the step ran are skipped. Returns (seq, token, logprob) for
        every token sampled this step, in plan order.
        """
        out = []
        for rank, rank_plan in enumerate(plan.ranks):
            for w in rank_plan.work:
                seq = self.seqs.get(w.seq_id)
                if seq is None or seq.status is not SeqStatus.RUNNING:
                    continue
                seq.num_computed = w.context_len
                if w.sample is not None:
                    if w.seq_id not in sampled:
                        raise RuntimeError(f"rank {rank} returned no token for sequence {w.seq_id} in step {plan.step}")
                    token, logprob = sampled[w.seq_id]
                    seq.token_ids.append(token)
                    out.append((seq, token, logprob))
        return out

    # ---- internals -------------------------------------------------------------------------
    def _work(self, seq: Sequence, n: int) -> SeqWork:
        start = seq.num_computed
        last = start + n == len(seq)
        req = seq.request
        sample = None
        if last:
            sp = req.sampling
            sample = SampleSpec(sp.temperature, sp.top_p, sp.top_k, seq.seed, req.logprobs)
        return SeqWork(seq.seq_id, seq.token_ids[start:start + n], start, list(seq.block_table), sample)

    def _ensure_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens`, preempting the rank's newest
        sequences if needed. False if `seq` itself had to be preempted."""
        bm = self.blocks[seq.rank]
        need = blocks_for(num_tokens, self.block_size) - len(seq.block_table)
        while need > 0 and not bm.can_allocate(need):
            victim = self.running[seq.rank][-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.block_table.extend(bm.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running[seq.rank].remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # newest preempted first; the next older lands in front of it

    def _release(self, seq: Sequence) -> None:
        self.blocks[seq.rank].free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.rank = -1

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences onto ranks, first come first served, while they fit."""
        admitted = []
        while self.waiting:
            seq = self.waiting[0]
            need = blocks_for(len(seq), self.block_size)
            rank = self._pick_rank(need)
            if rank is None:
                break
            self.waiting.popleft()
            seq.rank = rank
            seq.block_table = self.blocks[rank].allocate(need)
            seq.num_computed = 0
            seq.status = SeqStatus.RUNNING
            seq.admit_order = self._admit_counter
            self._admit_counter += 1
            self.running[rank].append(seq)
            admitted.append(seq)
        return admitted

    def _pick_rank(self, need: int) -> int | None:
        best, best_key = None, None
        for r in range(self.num_ranks):
            bm, running = self.blocks[r], self.running[r]
            if len(running) >= self.max_num_seqs:
                continue
            headroom = self._watermark if running else 0
            if bm.num_free - need < headroom:
                continue
            key = (bm.num_free, -len(running), -r)
            if best_key is None or key > best_key:
                best, best_key = r, key
        return best

    # ---- stats -----------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return sum(len(r) for r in self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_blocks_used(self) -> int:
        return sum(b.num_used for b in self.blocks)

    @property
    def kv_blocks_total(self) -> int:
        return sum(b.num_blocks for b in self.blocks)
