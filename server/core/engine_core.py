"""EngineCore: rank 0's scheduler and model runner behind a narrow, synchronous interface.

    core.add_request(EngineRequest)     token ids in; raises ResourceExhaustedError when full
    core.abort([req_id, ...])           frees the sequences and their KV blocks on return
    core.request_expert_load(reset)     -> ticket; answered by a later step's StepOutputs
    core.switch_routing_policy(routing) every rank switches policy before the next step's forward
    core.routing_policy()               -> RoutingPolicyState: the policy all ranks run, since when
    core.step() -> StepOutputs          one engine step: every request's new tokens at once

The core knows no text, no asyncio and no gRPC: CoreLoop (loop.py) drives it, in the
engine-core process or on a thread, and sends each StepOutputs to the front end, which turns
it into stream chunks. Token-level stops (EOS, stop token ids, max_new_tokens,
max_model_len) end sequences here; stop strings are the caller's, who aborts on a match.

Overlapped steps (`engine.overlap`, the default): `step()` plans and launches step n+1, then
applies step n and returns step n's outputs, so planning and post-processing run while the
device (or the step thread: CPU forwards, gloo EP collectives) runs the step. Sampled tokens
stay on the device as the next step's inputs. A sequence that finishes or is aborted after
step n drops what step n+1 computed for it (scheduler.update). Each call still returns at
most one step's outputs; `has_work` stays true while a step is in flight.

Threads: `step` is called from one thread at a time. `add_request`, `abort`,
`request_expert_load`, `has_work` and `stats` may be called from any thread, also while a
step runs: the lock is held while planning and while applying a step's results, never
while the model runs, so a cancelled sequence is freed at once and a step in flight ignores
its token.
"""
from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..engine.api import EngineStats, ModelInfo, RoutingPolicyState
from .step_io import EngineRequest, StepOutputs
from . import prompt_lp_outputs
from .executor import Executor
from ..worker.routed_experts import to_wire
from .scheduler import Scheduler
from .sequence import Sequence
from .slow_steps import SlowStepLog
from .step_watchdog import StepWatchdog
from .stops import token_stop_reason

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, plan, *, executor: Executor, device: str) -> None:
        """`plan`: the LaunchPlan the ranks were built from (server/launch_plan.py)."""
        self.app, self.spec, self.policy = plan.app, plan.spec, plan.policy
        app = plan.app
        self.executor = executor
        self.device = device
        self.max_model_len = plan.max_model_len
        eng = app.engine
        self.scheduler = Scheduler(
            num_ranks=executor.num_ranks,
            num_blocks=executor.runner.kv_size.num_blocks,  # what every rank allocated (worker/kv_sizing.py)
            block_size=eng.kv_block_size,
            max_num_seqs=eng.max_num_seqs,
            max_num_batched_tokens=eng.max_num_batched_tokens,
            max_queue=eng.max_queue,
            eos_token_ids=tuple(plan.spec.eos_token_ids),
        )
        self._eos = frozenset(plan.spec.eos_token_ids)
        self._lock = threading.Lock()
        self._seeds = random.SystemRandom()
        self._forward_steps = 0  # forward steps applied
        self._planned_forward = 0  # forward steps planned (the EPLB cadence)
        self._overlap = eng.overlap
        self._inflight: deque = deque()  # (plan, StepFuture, load tickets): launched, not yet applied
        self._load_requests: list[tuple[int, bool]] = []  # (ticket, reset) not yet planned
        self._routing: dict[str, Any] | None = None  # a policy switch not yet planned
        self._routing_state = policy_state(plan.policy)
        self._tickets = itertools.count(1)
        self._eplb_interval = app.parallel.eplb_interval  # forward steps between EPLB rebalances (0: never)
        self.eplb_reports: deque = deque(maxlen=64)  # RebalanceReport of recent rebalances (rank 0's view)
        self.watchdog = StepWatchdog(eng.step_timeout_s, eng.first_step_timeout_s)  # a hung rank: step_watchdog.py
        self._slow = SlowStepLog(eng.slow_step_factor) if eng.slow_step_factor else None
        self._timed: tuple | None = None  # (launched, finished) forward plans of the step() call being timed

    # ---- inputs (any thread) ------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> None:
        """Queue a request (validated by the caller). Raises ResourceExhaustedError when the
        queue is full or the request could never fit one rank's KV cache."""
        prompt_len = len(req.prompt_token_ids)
        assert 0 < prompt_len < self.max_model_len, f"request {req.req_id}: prompt of {prompt_len} tokens"
        max_total = min(prompt_len + req.stops.max_new_tokens, self.max_model_len)
        seed = req.sampling.seed if req.sampling.seed is not None else self._seeds.getrandbits(63)
        with self._lock:
            if req.req_id in self.scheduler.seqs:
                raise ValueError(f"request id {req.req_id} is already in the engine")
            seq = Sequence.create(req.req_id, req, seed, max_total, time.monotonic())
            parent = self.scheduler.seqs.get(req.prefix_of) if req.prefix_of >= 0 else None
            # n > 1: share the prompt's full blocks (at least one token is left to compute and sample from)
            shared = (prompt_len - 1) // self.scheduler.block_size * self.scheduler.block_size
            if parent is not None and shared > 0 and parent.request.prompt_token_ids == req.prompt_token_ids:
                self.scheduler.add_fork(seq, parent, shared)
            else:
                self.scheduler.add(seq)

    def abort(self, req_ids: Iterable[int]) -> None:
        """Drop these requests now (unknown or finished ids are ignored): their KV blocks are
        free on return, and no later StepOutputs names them."""
        with self._lock:
            for req_id in req_ids:
                seq = self.scheduler.seqs.get(req_id)
                if seq is not None:
                    self.scheduler.finish(seq)

    def request_expert_load(self, reset: bool = False) -> int:
        """Ask for the expert-load counters, summed over EP ranks (every rank joins the next
        step). Returns a ticket; the StepOutputs whose `load_tickets` holds it carries the answer."""
        with self._lock:
            ticket = next(self._tickets)
            self._load_requests.append((ticket, bool(reset)))
            return ticket

    def switch_routing_policy(self, routing: Mapping[str, Any]) -> None:
        """Every EP rank switches to the policy the routing.* mapping `routing` names, before the
        next step's forward (one plan carries it to all ranks; worker/policy_switch.py). Rank 0
        builds the policy first, so a mapping the model cannot serve raises ConfigError here
        and never reaches a worker. The StepOutputs of that step names the policy (`routing`)."""
        self.executor.runner.policies.policy_for(routing)
        with self._lock:
            self._routing = dict(routing)

    def has_work(self) -> bool:
        with self._lock:
            return (bool(self._inflight) or self.scheduler.has_work() or bool(self._load_requests)
                    or self._routing is not None)

    # ---- one step (the driving thread) ----------------------------------------------------------
    def step(self) -> StepOutputs:
        """Plan and launch the next step on every rank; apply the oldest step in flight and
        return its outputs (overlap: the step before the one just launched). An idle step runs
        only as a heartbeat for EP workers. Raises whatever the executor raises (a dead rank, a
        failed forward): the core is then dead. Timed by the step watchdog (`hung_step`); a call
        far slower than the recent ones is logged with what it held (engine.slow_step_factor)."""
        self.watchdog.begin()
        try:
            if self._slow is None:
                return self._step()
            start = time.perf_counter()
            self._timed = None
            out = self._step()
            if self._timed is not None:
                self._slow.observe(time.perf_counter() - start, *self._timed)
            return out
        finally:
            self.watchdog.end()

    def _step(self) -> StepOutputs:
        with self._lock:
            loads, self._load_requests = self._load_requests, []
            snapshot = any(reset for _, reset in loads) if loads else None
            plan = self.scheduler.plan(load_snapshot=snapshot)
            if plan.ranks[0].run_forward:
                self._planned_forward += 1
                if self._eplb_interval and self._planned_forward % self._eplb_interval == 0:
                    plan = plan.with_rebalance()
            if self._routing is not None:
                plan, self._routing = plan.with_routing(self._routing), None
            if plan.ranks[0].routing is not None or plan.ranks[0].rebalance:
                self.watchdog.expect_long()  # graphs captured again, experts moved
        tickets = [ticket for ticket, _ in loads]
        if plan.is_idle and not self._inflight and self.executor.needs_heartbeat:
            # A heartbeat runs to completion: left in flight, it would keep has_work() true and
            # the loop would spin heartbeats back to back instead of blocking until work comes.
            return self._apply(plan, self.executor.execute(plan), tickets)
        launched = not plan.is_idle  # idle with a step in flight: finish that one first
        forward = plan if plan.ranks[0].run_forward else None
        if launched and not self._overlap:
            self._timed = (forward, forward)
            return self._apply(plan, self.executor.execute(plan), tickets)
        if launched:
            self._inflight.append((plan, self.executor.submit(plan), tickets))
            if forward is not None:
                self._timed = (forward, None)
        if len(self._inflight) > (1 if launched else 0):  # keep one in flight while there is a next one
            done, future, done_tickets = self._inflight[0]
            if forward is not None or done.ranks[0].run_forward:
                self._timed = (forward, done if done.ranks[0].run_forward else None)
            try:
                results = future.result()
            finally:
                self._inflight.popleft()
            return self._apply(done, results, done_tickets)
        return StepOutputs(forward_steps=self._forward_steps)

    def _apply(self, plan, results, tickets: list[int]) -> StepOutputs:
        out = StepOutputs(load_tickets=tickets, expert_load=results[0].load if tickets else None)
        if results[0].rebalance is not None:
            self.eplb_reports.append(results[0].rebalance)
            out.rebalance = results[0].rebalance
        if plan.ranks[0].routing is not None:
            switched = {r.routing for r in results}
            if len(switched) != 1:
                raise RuntimeError(f"EP ranks disagree on the routing policy after a switch: {sorted(map(str, switched))}")
            out.routing = switched.pop()
            self.policy = self.executor.runner.model.policy
            # every rank reset its load counters before this step's forward
            self._routing_state = policy_state(self.policy, time.time(), self._forward_steps)
        now = time.monotonic()
        with self._lock:
            if plan.ranks[0].run_forward:
                self._forward_steps += 1
            if out.expert_load is not None:  # read after this step's forward: its counts are in
                out.expert_load = replace(out.expert_load, engine_step=self._forward_steps)
            req_ids, token_ids, logprobs, finished = out.req_ids, out.token_ids, out.logprobs, out.finished
            routed = _collect_routed(plan, results)
            if routed:
                out.routed = []
            prompt_lp_outputs.collect(plan, results)
            tops = any(r.top_ids is not None for r in results)
            out.top_logprobs = [] if tops else None
            for seq, token, logprob in self.scheduler.update(plan, results):
                if seq.first_token_time is None:
                    seq.first_token_time = now
                req_ids.append(seq.seq_id)
                token_ids.append([token])
                logprobs.append([logprob] if logprob is not None else None)
                if routed:
                    out.routed.append(to_wire(seq.routed_pending) if seq.routed_pending else None)
                    seq.routed_pending = []
                if tops:
                    out.top_logprobs.append(list(seq.last_top) if seq.last_top is not None else None)
                    seq.last_top = None
                prompt_lp_outputs.add(out, seq)  # with the sequence's first token
                reason = token_stop_reason(seq, token, self._eos)
                if reason is not None:
                    finished[seq.seq_id] = reason
                    self.scheduler.finish(seq)
            out.forward_steps = self._forward_steps
        return out

    # ---- start-up -----------------------------------------------------------------------------
    def warm_up(self, force: bool = False) -> float | None:
        """Run the start-up warm-up (server/worker/warmup.py) on every rank at once, before any
        request: every kernel variant a step can need compiles now, not mid-stream. Skipped
        off CUDA (nothing compiles; `force` runs it anyway) and under a host-side routing
        policy (routing=record would write the warm-up into its trace). -> seconds, or None."""
        from dataclasses import replace

        from ..worker.step_plan import RankBatch, build_step_plan
        from ..worker.warmup import plan_warmup

        runner = self.executor.runner
        if runner.device.type != "cuda" and not force:
            log.info("warm-up skipped on %s: nothing is compiled there", runner.device)
            return None
        if not self.policy.graph_safe:
            log.info("warm-up skipped: routing policy %r works host-side and would record it", self.policy.name)
            return None
        start = time.perf_counter()
        warm = plan_warmup(runner.model, max_tokens=runner.max_tokens, max_seqs=runner.max_seqs, width=runner.width,
                           block_size=runner.block_size)
        plan = build_step_plan(0, [RankBatch.empty() for _ in range(self.executor.num_ranks)])
        plan.ranks = [replace(p, warmup=warm) for p in plan.ranks]
        results = self.executor.execute(plan)
        seconds = time.perf_counter() - start
        log.info("warm-up: %d forwards (prompt tokens %s; decode batches %s; mixed %s) and %d expert calls in %.2f s "
                 "(slowest rank %.2f s)", warm.num_forwards, list(warm.prefill_tokens), list(warm.decode_seqs),
                 warm.mixed, len(warm.expert_rows), seconds, max(r.warmup_s or 0.0 for r in results))
        return seconds

    # ---- info --------------------------------------------------------------------------------
    def routing_policy(self) -> RoutingPolicyState:
        """As of the last step applied (a switch shows once the step that carried it is back)."""
        return self._routing_state

    def stats(self) -> EngineStats:
        with self._lock:
            sch = self.scheduler
            return EngineStats(running=sch.num_running, waiting=sch.num_waiting, kv_blocks_used=sch.kv_blocks_used,
                               kv_blocks_total=sch.kv_blocks_total, steps=self._forward_steps)

    def model_info(self) -> ModelInfo:
        s, cfg = self.spec, self.app.model
        # `model.path=/ckpt/x` alone keeps the default name "tiny": name the folder instead.
        name = Path(cfg.path).name if cfg.path and cfg.name == "tiny" else cfg.name
        return ModelInfo(
            model_name=name,
            architecture=s.architecture,
            num_layers=s.num_layers,
            num_moe_layers=s.num_moe_layers,
            num_experts=s.num_experts,
            top_k=s.top_k,
            hidden_size=s.hidden_size,
            vocab_size=s.vocab_size,
            max_model_len=self.max_model_len,
            dtype=s.dtype,
            device=self.device,
            ep_size=self.executor.num_ranks,
            routing_policy=self.policy.name,
            routing_params=self.policy.params(),
            eos_token_ids=tuple(s.eos_token_ids),
        )

    # ---- life cycle ----------------------------------------------------------------------------
    def bind_thread(self) -> None:
        """Make rank 0's device current for the calling (stepping) thread."""
        self.executor.bind_thread()

    def dead_rank(self) -> str | None:
        """Why an EP rank is gone ("EP rank 1 exited ..."), or None while all live."""
        return self.executor.dead_rank()

    def hung_step(self) -> str | None:
        """Why the step in flight counts as hung (it ran past the watchdog's limit), or None."""
        return self.watchdog.overdue()

    def dead_rank_within(self, seconds: float) -> str | None:
        """A collective error usually means a rank died: name it if it did (its exit is
        noticed a moment after its sockets close)."""
        deadline = time.monotonic() + seconds
        while True:
            dead = self.executor.dead_rank()
            if dead is not None or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every EP rank (graceful: tell them; else make sure they are gone)."""
        self.executor.stop(graceful=graceful)


def _collect_routed(plan, results) -> bool:
    """Hand each sequence its rows of the ranks' routed experts (kept until its next token goes
    out: a prompt chunk's rows wait for the chunk that samples). -> whether the step had any."""
    any_rows = False
    for rank, owners in enumerate(plan.routed):
        if not owners:
            continue
        rows, at = results[rank].routed, 0  # [R, L, k] int16
        for seq, n in owners:
            if not seq.is_finished:
                seq.routed_pending.append(rows[at:at + n])
            at += n
        any_rows = True
    return any_rows


def policy_state(policy, counters_reset_unix_s: float = 0.0, since_step: int = 0) -> RoutingPolicyState:
    """A built policy as the API reports it: canonical name, parameters, guarantee."""
    return RoutingPolicyState(name=policy.name, params=dict(policy.params()), guarantee=type(policy).guarantee,
                              counters_reset_unix_s=counters_reset_unix_s, since_step=since_step)
