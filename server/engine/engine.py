"""ServingEngine: the in-process Engine (rank 0) — EngineCore driven by a step thread.

asyncio side: `generate` validates and queues a request, then streams its chunks;
`expert_load` asks the core for a snapshot at its next step. Step thread: while there is work,
`core.step()`, then turn the step's StepOutputs into chunks (detokenize, stop strings) and hand
each asyncio loop all of its chunks in one call. Cancelling a stream frees its KV blocks at once
(core.abort; a step in flight ignores the sequence's token). A dead rank or a failed step fails
every in-flight request with EngineUnavailableError and marks the engine dead.

`python -m server` runs the core in its own process instead (server/engine/core_client.py);
this class is the in-process driver for tests, benchmarks and `server.engine_process=false`.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..config import ConfigError
from ..moe.load_stats import ExpertLoadSnapshot
from .api import (
    EngineStats, EngineUnavailableError, GenerationChunk, GenerationRequest, InvalidPolicyError, ModelInfo,
    RoutingPolicyState,
)
from .core import EngineCore
from .core_types import EngineRequest, StepOutputs
from .detokenizer import fast_decode
from .output import RequestOutput
from .policy_switch import refuse_file_policies
from .request_checks import check_invariants
from .stream import RequestStream, deliver_threadsafe, settle_future

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # idle distributed engines ping their workers this often
WATCH_S = 0.2  # dead-rank polling period


@dataclass
class _Live:
    """A request in flight: its text side, its stream, and the loop that reads the stream."""

    output: RequestOutput
    stream: RequestStream
    loop: asyncio.AbstractEventLoop


class ServingEngine:
    def __init__(self, core: EngineCore, tokenizer, stream_interval: int = 1) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self._decode_text = fast_decode(tokenizer)
        self._cond = threading.Condition()
        self._requests: dict[int, _Live] = {}
        self._load_waiters: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}  # ticket ->
        self._switch_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []  # the next switch's callers
        spec = core.spec
        self._row_bytes = spec.num_moe_layers * spec.top_k * 2  # one routed-experts row
        self._ids = itertools.count()
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

    # ---- what the core holds ----------------------------------------------------------------
    @property
    def executor(self):
        return self.core.executor

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def eplb_reports(self):
        return self.core.eplb_reports

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    # ---- text --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids`, special tokens (EOS, padding) left out — as streamed."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.core.spec.vocab_size

    # ---- info ----------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self.core.model_info()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def routing_policy(self) -> RoutingPolicyState:
        return self.core.routing_policy()

    async def set_routing_policy(self, routing) -> RoutingPolicyState:
        """Every rank switches between two steps; returns once the step that carried it is back."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            self._check_alive()
            try:
                refuse_file_policies(routing)  # a switch from the API never gets the server's file access
                self.core.switch_routing_policy(routing)
            except ConfigError as exc:
                raise InvalidPolicyError(str(exc)) from None
            self._switch_waiters.append((loop, fut))
            self._cond.notify_all()
        return await fut

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
        stream = RequestStream(self.stream_interval)
        req_id = self._submit(request, stream, asyncio.get_running_loop())
        try:
            while True:
                chunk = await stream.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self.abort(req_id)

    def abort(self, req_id: int) -> None:
        """Drop a request now (no-op if it already finished): its KV blocks are free on return."""
        with self._cond:
            if self._requests.pop(req_id, None) is not None:
                self.core.abort([req_id])

    async def expert_load(self, reset: bool = False) -> ExpertLoadSnapshot:
        """Expert-load counters summed over EP ranks (every rank joins at the next step)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            self._check_alive()
            self._load_waiters[self.core.request_expert_load(reset)] = (loop, fut)
            self._cond.notify_all()
        return await fut

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise EngineUnavailableError(f"engine is dead: {self._failure}")
        if self._stopping:
            raise EngineUnavailableError("engine is shutting down")

    def _submit(self, request: GenerationRequest, stream: RequestStream, loop: asyncio.AbstractEventLoop) -> int:
        check_invariants(request, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        with self._cond:
            self._check_alive()
            req_id = next(self._ids)
            self.core.add_request(EngineRequest(req_id, request.prompt_token_ids, request.sampling, request.stops,
                                                request.logprobs, request.routed_experts))  # may raise ResourceExhaustedError
            self._requests[req_id] = _Live(RequestOutput(request, self._decode_text, routed_row_bytes=self._row_bytes),
                                           stream, loop)
            self._cond.notify_all()
        return req_id

    # ---- the step loop (engine thread) -------------------------------------------------------
    def _run(self) -> None:
        try:
            self.core.bind_thread()
            while True:
                with self._cond:
                    deadline = time.monotonic() + HEARTBEAT_S
                    while not (self._stopping or self._failure or self.core.has_work()):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break  # idle: one heartbeat step (a no-op without EP workers)
                        self._cond.wait(left)
                    if self._stopping or self._failure:
                        return
                self._deliver(self.core.step())
        except BaseException as exc:  # noqa: BLE001 - any failure of a step is fatal
            log.exception("engine step failed")
            self._fail(self.core.dead_rank_within(1.0) or f"engine step failed: {exc}")
        finally:
            self.core.shutdown(graceful=self._failure is None)

    def _deliver(self, out: StepOutputs) -> None:
        """One step's tokens -> chunks, handed to each consumer loop in one call."""
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        stopped: list[int] = []  # ended by a stop string: the core still runs them
        with self._cond:
            for i, req_id in enumerate(out.req_ids):
                live = self._requests.get(req_id)
                if live is None:
                    continue
                reason = out.finished.get(req_id)
                chunk = live.output.on_tokens(out.token_ids[i], out.logprobs[i], reason, now,
                                              out.routed[i] if out.routed is not None else None)
                by_loop[live.loop].append((req_id, live.stream, chunk))
                if chunk.finish_reason is not None:
                    del self._requests[req_id]
                    if reason is None:
                        stopped.append(req_id)
            if stopped:
                self.core.abort(stopped)
            waiters = [self._load_waiters.pop(t) for t in out.load_tickets if t in self._load_waiters]
            switched = []
            if out.routing is not None:
                switched, self._switch_waiters = self._switch_waiters, []
        for loop, items in by_loop.items():
            if not deliver_threadsafe(loop, [(stream, chunk) for _, stream, chunk in items]):
                for req_id, _, _ in items:  # the consumer's loop is gone: nobody reads these
                    self.abort(req_id)
        for loop, fut in waiters:
            settle_future(loop, fut, out.expert_load)
        for loop, fut in switched:
            settle_future(loop, fut, self.core.routing_policy())

    def _watch_ranks(self) -> None:
        while not self._stopping and self._failure is None:
            dead = self.core.dead_rank() or self.core.hung_step()
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
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for live in self._requests.values():
            by_loop[live.loop].append((live.stream, error))
        self.core.abort(list(self._requests))
        self._requests.clear()
        for loop, items in by_loop.items():
            deliver_threadsafe(loop, items)
        for loop, fut in (*self._load_waiters.values(), *self._switch_waiters):
            settle_future(loop, fut, error)
        self._load_waiters.clear()
        self._switch_waiters.clear()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the step loop and every rank; in-flight requests end with EngineUnavailableError."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._close_all(EngineUnavailableError("engine shut down"))
            self._cond.notify_all()
        if self._thread.is_alive():  # a failed engine's step may never return (a hung rank): do not wait long
            self._thread.join(timeout if self._failure is None else min(timeout, 2.0))
        if self._thread.is_alive():
            log.error("engine thread did not stop within %.0fs; stopping ranks forcibly", timeout)
            self.core.shutdown(graceful=False)
        elif not self._thread.ident:
            self.core.shutdown(graceful=True)
