"""ServingEngine: the Engine the gRPC layer talks to (rank 0).

asyncio side: `generate` validates and queues a request, then streams its chunks;
`expert_load` queues a collective. Engine thread: a loop of steps — plan (scheduler, under
the lock), execute on every rank (no lock held), apply results, detokenize, check stops,
hand chunks to each request's asyncio loop. Cancelling a stream frees its KV blocks at once
(under the lock; a step in flight ignores the sequence's result). A dead rank or a failed
step fails every in-flight request with EngineUnavailableError and marks the engine dead.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
from collections import deque
from pathlib import Path
from typing import AsyncIterator, Callable

from ..moe.load_stats import ExpertLoadSnapshot
from .api import EngineStats, EngineUnavailableError, GenerationChunk, GenerationRequest, ModelInfo
from .executor import Executor
from .output import RequestOutput
from .request_checks import validate_request
from .scheduler import Scheduler
from .sequence import Sequence
from .stream import RequestStream, settle_future

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # idle distributed engines ping their workers this often
WATCH_S = 0.2  # dead-rank polling period


class ServingEngine:
    def __init__(self, *, app, spec, policy, executor: Executor, tokenizer, device: str, max_model_len: int) -> None:
        self.app, self.spec, self.policy = app, spec, policy
        self.executor = executor
        self.tokenizer = tokenizer
        self.device = device
        self.max_model_len = max_model_len
        eng = app.engine
        self.scheduler = Scheduler(
            num_ranks=executor.num_ranks,
            num_blocks=eng.kv_cache_tokens // eng.kv_block_size,
            block_size=eng.kv_block_size,
            max_num_seqs=eng.max_num_seqs,
            max_num_batched_tokens=eng.max_num_batched_tokens,
            max_queue=eng.max_queue,
        )
        self._eos = frozenset(spec.eos_token_ids)
        self._cond = threading.Condition()
        self._outputs: dict[int, RequestOutput] = {}
        self._load_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future, bool]] = []
        self._inflight_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future, bool]] = []
        self._ids = itertools.count()
        self._seeds = random.SystemRandom()
        self._steps = 0
        self._eplb_interval = app.parallel.eplb_interval  # forward steps between EPLB rebalances (0: never)
        self.eplb_reports: deque = deque(maxlen=64)  # RebalanceReport of recent rebalances (rank 0's view)
        self._stopping = False
        self._failure: str | None = None
        self._failed = threading.Event()
        self._failure_callbacks: list[Callable[[str], None]] = []
        self._thread = threading.Thread(target=self._run, name="epserve-engine", daemon=True)
        self._watch = threading.Thread(target=self._watch_ranks, name="epserve-rank-watch", daemon=True)

    def start(self) -> "ServingEngine":
        self._thread.start()
        self._watch.start()
        return self

    # ---- text --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids`, special tokens (EOS, padding) left out — as streamed."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    # ---- info ----------------------------------------------------------------------------
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

    def stats(self) -> EngineStats:
        with self._cond:
            sch = self.scheduler
            return EngineStats(running=sch.num_running, waiting=sch.num_waiting, kv_blocks_used=sch.kv_blocks_used,
                               kv_blocks_total=sch.kv_blocks_total, steps=self._steps)

    # ---- health ----------------------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        """Why the engine died (None while healthy). A dead engine never recovers."""
        return self._failure

    @property
    def is_alive(self) -> bool:
        return self._failure is None and not self._stopping

    def wait_failed(self, timeout: float | None = None) -> bool:
        """Block until the engine dies (True) or `timeout` passes (False)."""
        return self._failed.wait(timeout)

    def add_failure_callback(self, callback: Callable[[str], None]) -> None:
        """`callback(reason)` runs once, on an engine thread, when the engine dies."""
        with self._cond:
            if self._failure is None:
                self._failure_callbacks.append(callback)
                return
        callback(self._failure)

    # ---- requests --------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        stream = RequestStream(asyncio.get_running_loop())
        seq = self._submit(request, stream)
        try:
            while True:
                chunk = await stream.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self.abort(seq.seq_id)

    def abort(self, seq_id: int) -> None:
        """Drop a sequence now (no-op if it already finished): its KV blocks are free on return."""
        with self._cond:
            out = self._outputs.pop(seq_id, None)
            if out is not None:
                self.scheduler.finish(out.seq)

    async def expert_load(self, reset: bool = False) -> ExpertLoadSnapshot:
        """Expert-load counters summed over EP ranks (every rank joins at the next step)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            self._check_alive()
            self._load_waiters.append((loop, fut, bool(reset)))
            self._cond.notify_all()
        return await fut

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise EngineUnavailableError(f"engine is dead: {self._failure}")
        if self._stopping:
            raise EngineUnavailableError("engine is shutting down")

    def _submit(self, request: GenerationRequest, stream: RequestStream) -> Sequence:
        validate_request(request, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        prompt_len = len(request.prompt_token_ids)
        max_total = min(prompt_len + request.stops.max_new_tokens, self.max_model_len)
        seed = request.sampling.seed if request.sampling.seed is not None else self._seeds.getrandbits(63)
        with self._cond:
            self._check_alive()
            seq = Sequence.create(next(self._ids), request, seed, max_total, time.monotonic())
            self.scheduler.add(seq)  # may raise ResourceExhaustedError
            self._outputs[seq.seq_id] = RequestOutput(seq, stream, self._decode_generated, self._eos)
            self._cond.notify_all()
        return seq

    def _decode_generated(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- the step loop (engine thread) -------------------------------------------------------
    def _run(self) -> None:
        try:
            self.executor.bind_thread()
            while True:
                with self._cond:
                    deadline = time.monotonic() + HEARTBEAT_S
                    while not (self._stopping or self._failure or self.scheduler.has_work() or self._load_waiters):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if self._stopping or self._failure:
                        return
                    waiters, self._load_waiters = self._load_waiters, []
                    self._inflight_waiters = waiters  # settled with an error if the step never ends
                    load = any(reset for _, _, reset in waiters) if waiters else None
                    plan = self.scheduler.plan(load_snapshot=load)
                    if self._eplb_interval and plan.ranks[0].run_forward and (self._steps + 1) % self._eplb_interval == 0:
                        plan = plan.with_rebalance()
                if plan.is_idle and not self.executor.needs_heartbeat:
                    continue
                results = self.executor.execute(plan)
                if results[0].rebalance is not None:
                    self.eplb_reports.append(results[0].rebalance)
                self._apply(plan, results)
                if waiters:
                    snapshot = results[0].load
                    for loop, fut, _ in waiters:
                        settle_future(loop, fut, snapshot)
        except BaseException as exc:  # noqa: BLE001 - any failure of a step is fatal
            log.exception("engine step failed")
            self._fail(self._dead_rank_within(1.0) or f"engine step failed: {exc}")
        finally:
            self.executor.stop(graceful=self._failure is None)

    def _apply(self, plan, results) -> None:
        now = time.monotonic()
        sampled = {sid: (tok, lp) for res in results for sid, tok, lp in res.sampled}
        with self._cond:
            if plan.ranks[0].run_forward:
                self._steps += 1
            for seq, token, logprob in self.scheduler.update(plan, sampled):
                out = self._outputs.get(seq.seq_id)
                if out is None:
                    continue
                chunk = out.on_token(token, logprob, now)
                delivered = out.stream.put(chunk)
                if chunk.finish_reason is not None or not delivered:
                    self._outputs.pop(seq.seq_id, None)
                    self.scheduler.finish(seq)

    def _dead_rank_within(self, seconds: float) -> str | None:
        """A collective error usually means a rank died: name it if it did (its exit is
        noticed a moment after its sockets close)."""
        deadline = time.monotonic() + seconds
        while True:
            dead = self.executor.dead_rank()
            if dead is not None or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def _watch_ranks(self) -> None:
        while not self._stopping and self._failure is None:
            dead = self.executor.dead_rank()
            if dead is not None:
                self._fail(dead)
                return
            time.sleep(WATCH_S)

    def _fail(self, reason: str) -> None:
        with self._cond:
            if self._failure is not None:
                return
            self._failure = reason
            self._close_all(EngineUnavailableError(f"engine failed: {reason}"))
            callbacks, self._failure_callbacks = self._failure_callbacks, []
            self._cond.notify_all()
        log.error("engine failed: %s", reason)
        self._failed.set()
        for cb in callbacks:
            try:
                cb(reason)
            except Exception:
                log.exception("engine failure callback raised")

    def _close_all(self, error: Exception) -> None:
        """Fail every in-flight request and expert-load call (caller holds the lock)."""
        for out in self._outputs.values():
            out.stream.put(error)
            self.scheduler.finish(out.seq)
        self._outputs.clear()
        for loop, fut, _ in self._load_waiters + self._inflight_waiters:
            settle_future(loop, fut, error)  # no-op for one already settled
        self._load_waiters.clear()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the step loop and every rank; in-flight requests end with EngineUnavailableError."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._close_all(EngineUnavailableError("engine shut down"))
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("engine thread did not stop within %.0fs; stopping ranks forcibly", timeout)
            self.executor.stop(graceful=False)
        elif not self._thread.ident:
            self.executor.stop(graceful=True)

