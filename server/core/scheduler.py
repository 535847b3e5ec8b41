"""The one scheduler (rank 0): queue, rank assignment, KV blocks, continuous batching.

Every step it decides, for every EP rank, which sequences run and how many tokens each:
  * running sequences first, oldest first: a decoding one runs its one token, a prefilling
    one a chunk of its prompt under `max_num_batched_tokens` (per rank, prefill tokens only);
  * then waiting requests join the running batch (continuous batching), first come first
    served, each on the least-loaded rank that has room (most free KV blocks, then fewest
    running sequences), up to `max_num_seqs` per rank.

Overlapped steps: step n+1 may be planned while step n runs. A sequence whose last row in
step n samples has one token *pending*: the plan for step n+1 decodes it from the device
(its slot's last sampled token) at the position after its known tokens, and `update` appends
it when step n's results arrive. A sequence whose pending token is its last by length is not
scheduled again; one that stops on a token (EOS) may run one wasted row in step n+1, whose
result `update` drops because the sequence has finished by then.

Each running sequence holds a slot on its rank (step_plan.py): admission fills it, block
growth appends to its table, release frees it for the next admission.

n > 1: the request's other sequences wait in `forking` until the first one (their parent) has
planned its prompt up to the last full block. Then each takes a slot on the parent's rank and
shares those blocks (reference-counted, block_manager.py), computes only the rest of the
prompt in its own blocks, and from then on is an ordinary sequence. If the parent is
preempted or ends first, a waiting sequence joins the queue as an ordinary one (it recomputes
its whole prompt: same tokens, no sharing).

KV memory policy: blocks are allocated lazily — the whole current prompt on admission, then
one block whenever a decoding sequence crosses a block boundary. When a rank runs out, its
newest running sequence is preempted: its blocks are freed and it goes back to the front of
the queue with its tokens so far, to be recomputed as one longer prompt (sampling is keyed by
(seed, position), so its output does not change). A request that could not fit in a rank's
cache even alone is refused at submission, so every admitted request can always finish.
"""
from __future__ import annotations

from collections import deque

from ..engine.api import ResourceExhaustedError
from .block_manager import BlockManager, blocks_for
from .plan_builder import RankBatchBuilder
from .sequence import Sequence, SeqStatus
from ..worker.step_plan import RankResult, StepPlan, build_step_plan


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
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.num_ranks = num_ranks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_queue = max_queue
        self.eos_token_ids = tuple(eos_token_ids)  # min_tokens holds these back too (plan_builder.py)
        self.blocks = [BlockManager(num_blocks, block_size) for _ in range(num_ranks)]
        self.free_slots: list[list[int]] = [list(range(max_num_seqs - 1, -1, -1)) for _ in range(num_ranks)]
        self._builders: list[RankBatchBuilder] = []
        self.running: list[list[Sequence]] = [[] for _ in range(num_ranks)]
        self.waiting: deque[Sequence] = deque()
        self.forking: list[Sequence] = []  # n > 1: sequences waiting to share their parent's prompt blocks
        self.seqs: dict[int, Sequence] = {}
        self.step = 0
        self.num_preemptions = 0
        self.num_forks = 0  # sequences started on a parent's shared prompt blocks (n > 1)
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

    def add_fork(self, seq: Sequence, parent: Sequence, shared_len: int) -> None:
        """Queue `seq` to share the first `shared_len` prompt tokens' blocks of `parent` (same
        prompt, added before it; shared_len a multiple of the block size)."""
        self.check_fits(seq.max_total_len)
        if len(self.waiting) + len(self.forking) >= self.max_queue:
            raise ResourceExhaustedError(f"request queue is full ({self.max_queue} waiting; engine.max_queue)")
        seq.status = SeqStatus.WAITING
        seq.parent, seq.shared_len = parent, shared_len
        self.forking.append(seq)
        self.seqs[seq.seq_id] = seq

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and return its KV blocks at once (idempotent)."""
        if self.seqs.pop(seq.seq_id, None) is None:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running[seq.rank].remove(seq)
            self._release(seq)
        elif seq.status is SeqStatus.WAITING:
            (self.forking if seq.parent is not None else self.waiting).remove(seq)
            seq.parent = None
        seq.status = SeqStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting) or bool(self.forking) or any(self.running)

    # ---- one step ----
    def schedule(self) -> list[RankBatchBuilder]:
        """This step's work, per rank. Mutates block tables (allocation, preemption), slots and
        the sequences' computed / pending counts."""
        self._builders = builders = [RankBatchBuilder(self.eos_token_ids) for _ in range(self.num_ranks)]
        budget = [self.max_num_batched_tokens] * self.num_ranks
        if self.forking:
            self._fork()
        preempted = False
        bs = self.block_size
        for r in range(self.num_ranks):
            b, running = builders[r], self.running[r]
            i = 0
            while i < len(running):  # the hot loop: plain attribute reads, no properties
                seq = running[i]
                pending = seq.num_pending
                total = len(seq.token_ids) + pending
                if pending and total >= seq.max_total_len:
                    pass  # its last token is in flight: it finishes when that step's results arrive
                elif total - seq.num_computed == 1:  # decoding
                    if total > len(seq.block_table) * bs and not self._ensure_blocks(seq, total):
                        preempted = True  # `seq` itself went back to the queue
                        continue
                    b.add_decode(seq)
                elif budget[r] > 0:
                    n = min(seq.num_uncomputed, budget[r])
                    budget[r] -= n
                    b.add(seq, n)
                i += 1
        if not preempted:
            for seq in self._admit():
                r = seq.rank
                n = 1 if seq.is_decoding else min(seq.num_uncomputed, budget[r])
                if not seq.is_decoding:
                    budget[r] -= n
                if n > 0:
                    builders[r].add(seq, n)
        self.step += 1
        self._builders = []
        return builders

    def plan(self, load_snapshot: bool | None = None, stop: bool = False) -> StepPlan:
        builders = self.schedule()
        return build_step_plan(self.step, [b.build() for b in builders], [b.sampling for b in builders],
                               load_snapshot, stop, [b.routed for b in builders], [b.prompt_lp for b in builders])

    def update(self, plan: StepPlan, results: list[RankResult]) -> list[tuple[Sequence, int, float | None]]:
        """Apply a finished step: append each sampled token to its sequence.

        Tokens of sequences that finished or were cancelled since the step was planned are
        dropped (a preempted one keeps its token: it is part of its output). Returns (seq,
        token, logprob) for every token kept, in plan order.
        """
        out = []
        for rank, seqs in enumerate(plan.sampling):
            res = results[rank]
            if len(res.tokens) != len(seqs):
                raise RuntimeError(f"rank {rank} returned {len(res.tokens)} tokens for {len(seqs)} sampling rows "
                                   f"in step {plan.step}")
            if not seqs:
                continue
            tokens = res.tokens.tolist()
            logprobs = res.logprobs.tolist() if res.logprobs is not None else None
            top_ids, top_lps = res.top_ids, res.top_logprobs
            for i, seq in enumerate(seqs):
                seq.num_pending -= 1
                if seq.status is SeqStatus.FINISHED:
                    continue
                token = tokens[i]
                seq.token_ids.append(token)
                if top_ids is not None and seq.request.top_logprobs:
                    n_top = seq.request.top_logprobs
                    seq.last_top = (top_ids[i, :n_top].tolist(), top_lps[i, :n_top].tolist())
                out.append((seq, token, logprobs[i] if logprobs is not None and seq.request.logprobs else None))
        return out

    # ---- internals -------------------------------------------------------------------------
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
            new = bm.allocate(need)
            self._builders[seq.rank].append_blocks(seq.slot, len(seq.block_table), new)
            seq.block_table.extend(new)
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
        self.free_slots[seq.rank].append(seq.slot)
        seq.block_table = []
        seq.num_computed = 0
        seq.rank = -1
        seq.slot = -1

    def _admit(self) -> list[Sequence]:
        """Move waiting sequences onto ranks, first come first served, while they fit."""
        admitted = []
        while self.waiting:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with a token still in flight: recompute once it has landed
                break
            need = blocks_for(len(seq), self.block_size)
            rank = self._pick_rank(need)
            if rank is None:
                break
            self.waiting.popleft()
            seq.forked_from_slot = -1
            seq.block_table = self.blocks[rank].allocate(need)
            self._start(seq, rank)
            admitted.append(seq)
        return admitted

    def _fork(self) -> None:
        """Start the forking sequences whose parent's shared prompt blocks are planned (in an
        earlier step, so written before any step of theirs runs: a rank runs steps in order)."""
        bs = self.block_size
        for seq in list(self.forking):
            parent = seq.parent
            if parent.status is SeqStatus.RUNNING and parent.num_computed >= seq.shared_len:
                rank, shared = parent.rank, parent.block_table[:seq.shared_len // bs]
                bm = self.blocks[rank]
                need = blocks_for(len(seq), bs) - len(shared)
                if len(self.running[rank]) >= self.max_num_seqs or not bm.can_allocate(need):
                    continue  # its turn comes when the rank has room
                bm.share(shared)
                seq.block_table = shared + bm.allocate(need)
                seq.forked_from_slot = parent.slot
                self.num_forks += 1
                self.forking.remove(seq)
                seq.parent = None
                self._start(seq, rank)
                seq.num_computed = seq.shared_len
            elif parent.status is SeqStatus.FINISHED or parent.num_preemptions:
                self.forking.remove(seq)  # nothing left to share: an ordinary sequence
                seq.parent = None
                self.waiting.append(seq)

    def _start(self, seq: Sequence, rank: int) -> None:
        """`seq` (its block table set) takes a slot on `rank` and joins the running batch."""
        seq.rank = rank
        seq.slot = self.free_slots[rank].pop()
        builder = self._builders[rank]
        builder.fill(seq)
        builder.append_blocks(seq.slot, 0, seq.block_table)
        seq.num_computed = 0
        seq.status = SeqStatus.RUNNING
        seq.admit_order = self._admit_counter
        self._admit_counter += 1
        self.running[rank].append(seq)

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
        return len(self.waiting) + len(self.forking)

    @property
    def kv_blocks_used(self) -> int:
        return sum(b.num_used for b in self.blocks)

    @property
    def kv_blocks_total(self) -> int:
        return sum(b.num_blocks for b in self.blocks)
