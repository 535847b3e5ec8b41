"""The front end's Engine: the engine core runs in its own process; text lives here.

`await EngineProcess.start(app)` spawns the engine-core process (server/engine/core_process.py),
loads the tokenizer meanwhile, and returns once the core reports READY. Then, on the event loop:
  * `generate` validates, queues an add (all adds and aborts of one loop turn go out as one
    frame), and streams the request's chunks;
  * one reader task receives ONE frame per engine step, turns every request's new tokens into
    chunks (incremental detokenizing with the fast backend decode, stop strings, which abort
    the request in the core at once) and puts them on the requests' streams;
  * the core process's exit is watched through its sentinel: if it dies (or reports FAILED),
    every open stream and expert-load call ends with EngineUnavailableError and the failure
    callbacks run, so the server turns NOT_SERVING and exits non-zero; no call hangs;
  * so is its silence: a core process that sends nothing, not even its heartbeat, for
    engine.step_timeout_s is stopped (SIGSTOP) or frozen; it is failed the same way and
    killed (core_liveness.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable

import zmq
import zmq.asyncio

from ..config import AppConfig, ConfigError
from ..moe.load_stats import ExpertLoadSnapshot
from . import ipc
from .api import (
    EngineStats, EngineUnavailableError, GenerationChunk, GenerationRequest, InvalidPolicyError, InvalidRequestError,
    ModelInfo, ResourceExhaustedError, RoutingPolicyState,
)
from .core_types import EngineRequest
from .detokenizer import fast_decode
from .group_signals import spawning_signal_proof
from .core_liveness import CoreHeartbeat
from .input_batch import InputBatch, Unpackable
from .output import RequestOutput
from .request_checks import check_invariants
from .stream import RequestStream

log = logging.getLogger(__name__)
EXIT_GRACE_S = 0.3  # after the core process exits, frames it sent just before still get read


class CoreStartError(RuntimeError):
    """The engine core could not start for a reason other than the configuration."""


@dataclass
class _Live:
    output: RequestOutput
    stream: RequestStream


class EngineProcess:
    """Implements server.engine.api.Engine over the engine-core process."""

    def __init__(self, app: AppConfig, proc, sockets: ipc.SocketDir, ctx: zmq.asyncio.Context,
                 push: zmq.Socket, pull: zmq.asyncio.Socket) -> None:
        self.app = app
        self.proc = proc
        self._sockets, self._ctx, self._push, self._pull = sockets, ctx, push, pull
        self.stream_interval = app.server.stream_interval
        self.tokenizer = None
        self._decode_text: Callable[[list[int]], str] | None = None
        self._info: ModelInfo | None = None
        self._stats = EngineStats(0, 0, 0, 0, 0)
        self._requests: dict[int, _Live] = {}
        self._load_waiters: dict[int, asyncio.Future] = {}
        self._switch_waiters: dict[int, asyncio.Future] = {}
        self._routing: RoutingPolicyState | None = None
        self._row_bytes = 0
        self._ids = itertools.count()
        self._batch = InputBatch()  # what goes to the core at the end of this event-loop turn
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task | None = None
        self._heartbeat: CoreHeartbeat | None = None
        self._heartbeat_watch: asyncio.Task | None = None
        self._stopping = False
        self._failure: str | None = None
        self._failure_callbacks: list[Callable[[str], None]] = []
        self._join_lock = threading.Lock()

    # ---- start-up --------------------------------------------------------------------------------
    @classmethod
    async def start(cls, app: AppConfig) -> "EngineProcess":
        """Spawn the core, load the tokenizer meanwhile, wait for READY. Raises ConfigError or
        CoreStartError (after the core process is gone)."""
        from . import core_process
        from .launcher import app_to_dict

        sockets = ipc.SocketDir()
        ctx = zmq.asyncio.Context()
        pull = ctx.socket(zmq.PULL)
        pull.bind(sockets.outputs)
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.setsockopt(zmq.LINGER, 0)
        push.bind(sockets.inputs)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        proc = multiprocessing.get_context("spawn").Process(
            target=core_process.core_process_main, name="epserve-core",
            args=(app_to_dict(app), {"inputs": sockets.inputs, "outputs": sockets.outputs},
                  multiprocessing.current_process().pid, level))
        with spawning_signal_proof():  # it ignores Ctrl-C from its first instruction (group_signals.py)
            proc.start()
        self = cls(app, proc, sockets, ctx, push, pull)
        try:
            tokenizer = asyncio.ensure_future(asyncio.to_thread(_load_tokenizer, app))
            frame = await self._wait_ready()
            self.tokenizer = await tokenizer
        except BaseException:
            self._kill()
            raise
        self._decode_text = fast_decode(self.tokenizer)
        self._info = ipc.loads(frame[1])
        self._routing = ipc.loads(frame[2])
        self._row_bytes = self._info.num_moe_layers * self._info.top_k * 2  # one routed-experts row
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(proc.sentinel, self._on_process_exit)
        self._reader = asyncio.ensure_future(self._read_outputs())
        if app.engine.step_timeout_s > 0:  # 0: no watchdog, no deadline (e.g. a debugger on the core)
            self._heartbeat = CoreHeartbeat(app.engine.step_timeout_s, self._frame_waiting, self._on_silence)
            self._heartbeat_watch = asyncio.ensure_future(self._heartbeat.watch())
        log.info("engine core up in process %d", proc.pid)
        return self

    async def _wait_ready(self) -> list:
        while True:
            exited = self.proc.exitcode is not None  # read before polling: its last frame is then in
            if await self._pull.poll(200):
                frame = ipc.unpack(await self._pull.recv())
                if frame[0] == ipc.READY:
                    return frame
                if frame[0] == ipc.START_FAILED:
                    _, kind, message = frame
                    self.proc.join(10)
                    if kind == "config":
                        raise ConfigError(message)
                    if kind == "start":
                        raise CoreStartError(message)
                    raise RuntimeError(f"the engine core failed to start: {message}")
            elif exited:
                raise CoreStartError(f"the engine-core process exited during start-up (exit code "
                                     f"{self.proc.exitcode}); see its log above")

    # ---- text and info ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._info.vocab_size

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    def model_info(self) -> ModelInfo:
        return self._info

    def routing_policy(self) -> RoutingPolicyState:
        """As of the last switch the core confirmed."""
        return self._routing

    def stats(self) -> EngineStats:
        """As of the core's last step or input batch (it sends them with every frame)."""
        return self._stats

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def is_alive(self) -> bool:
        return self._failure is None and not self._stopping

    def add_failure_callback(self, callback: Callable[[str], None]) -> None:
        if self._failure is None:
            self._failure_callbacks.append(callback)
        else:
            callback(self._failure)

    # ---- requests (event loop) ------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._failure is not None:
            raise EngineUnavailableError(f"engine is dead: {self._failure}")
        if self._stopping:
            raise EngineUnavailableError("engine is shutting down")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        check_invariants(request, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        self._check_alive()
        req_id = next(self._ids)
        stream = RequestStream(self.stream_interval)
        self._requests[req_id] = _Live(RequestOutput(request, self._decode_text, routed_row_bytes=self._row_bytes), stream)
        self._batch.adds.append(ipc.request_fields(EngineRequest(req_id, request.prompt_token_ids, request.sampling,
                                                           request.stops, request.logprobs, request.routed_experts)))
        self._schedule_flush()
        try:
            while True:
                chunk = await stream.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            if self._requests.pop(req_id, None) is not None and self._failure is None:
                self._batch.aborts.append(req_id)
                self._schedule_flush()

    async def expert_load(self, reset: bool = False) -> ExpertLoadSnapshot:
        self._check_alive()
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._load_waiters[call_id] = fut
        self._batch.loads.append([call_id, bool(reset)])
        self._schedule_flush()
        try:
            return await fut
        finally:
            self._load_waiters.pop(call_id, None)

    async def set_routing_policy(self, routing) -> RoutingPolicyState:
        """Every rank switches between two steps; returns once the core applied it (or raises
        InvalidPolicyError, nothing changed)."""
        self._check_alive()
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._switch_waiters[call_id] = fut
        self._batch.switches.append([call_id, dict(routing)])
        self._schedule_flush()
        try:
            return await fut
        finally:
            self._switch_waiters.pop(call_id, None)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Everything queued during this loop turn, as one frame; an item that cannot be packed
        is refused to its caller, never left queued (input_batch.py)."""
        self._flush_scheduled = False
        if not self._batch or self._failure is not None:
            return
        frame, left_out = self._batch.take_frame()
        for item in left_out:
            self._refuse(item)
        if frame is not None:
            self._send(frame)

    def _refuse(self, item: Unpackable) -> None:
        if item.kind == "switch":
            fut = self._switch_waiters.get(item.item_id)
            if fut is not None and not fut.done():
                fut.set_exception(InvalidPolicyError(f"routing parameters {item.reason}"))
            return
        live = self._requests.pop(item.item_id, None)
        if live is not None:
            live.stream.put(InvalidRequestError("request", item.reason))

    def _send(self, frame: bytes, tries: int = 0) -> None:
        try:
            self._push.send(frame, zmq.NOBLOCK)
        except zmq.Again:  # the pipe to the core is not (or no longer) connected
            if self.proc.exitcode is None and tries < 500:
                self._loop.call_later(0.01, self._send, frame, tries + 1)
            else:
                self._fail(f"cannot reach the engine core (exit code {self.proc.exitcode})")

    # ---- outputs (reader task) ------------------------------------------------------------------------
    async def _read_outputs(self) -> None:
        try:
            while True:
                frame = ipc.unpack(await self._pull.recv())
                if self._heartbeat is not None:
                    self._heartbeat.beat()
                kind = frame[0]
                if kind == ipc.HEARTBEAT:
                    continue
                if kind == ipc.STEP:
                    self._on_step(frame)
                elif kind == ipc.STATS:
                    self._stats = ipc.stats_from_fields(frame[1])
                elif kind == ipc.REJECTED:
                    self._on_rejected(*frame[1:])
                elif kind == ipc.ROUTING:
                    self._on_routing(*frame[1:])
                elif kind == ipc.FAILED:
                    self._fail(frame[1])
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken output path is a dead engine
            log.exception("reading the engine core's outputs failed")
            self._fail(f"reading the engine core's outputs failed: {exc}")

    def _on_step(self, frame: list) -> None:
        _, req_ids, token_ids, logprobs, finished, stats, load, routed = frame
        self._stats = ipc.stats_from_fields(stats)
        reasons = ipc.finish_reasons(finished) if finished else {}
        now = time.monotonic()
        requests, stopped = self._requests, []
        for i, req_id in enumerate(req_ids):
            live = requests.get(req_id)
            if live is None:  # cancelled meanwhile, or ended by a stop string
                continue
            reason = reasons.get(req_id)
            chunk = live.output.on_tokens(token_ids[i], logprobs[i], reason, now,
                                          routed[i] if routed is not None else None)
            live.stream.put(chunk)
            if chunk.finish_reason is not None:
                del requests[req_id]
                if reason is None:
                    stopped.append(req_id)
        if stopped:
            self._batch.aborts.extend(stopped)
            self._schedule_flush()
        if load is not None:
            call_ids, snapshot = load[0], ipc.loads(load[1])
            for call_id in call_ids:
                fut = self._load_waiters.get(call_id)
                if fut is not None and not fut.done():
                    fut.set_result(snapshot)

    def _on_routing(self, call_ids: list[int], ok: bool, reply) -> None:
        if ok:
            self._routing = ipc.loads(reply)
            self._info = replace(self._info, routing_policy=self._routing.name, routing_params=self._routing.params)
        for call_id in call_ids:
            fut = self._switch_waiters.get(call_id)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(self._routing)
                else:
                    fut.set_exception(InvalidPolicyError(reply))

    def _on_rejected(self, req_id: int, kind: str, message: str) -> None:
        live = self._requests.pop(req_id, None)
        if live is not None:
            live.stream.put(ResourceExhaustedError(message) if kind == "exhausted"
                            else InvalidRequestError("request", message))

    # ---- failure and shutdown ------------------------------------------------------------------------
    def _frame_waiting(self) -> bool:
        return bool(self._pull.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def _on_silence(self, seconds: float) -> None:
        """The core sent nothing, not even a heartbeat, for too long: it does not run."""
        if self._stopping or self._failure is not None:
            return
        self._fail(f"the engine-core process (pid {self.proc.pid}) sent nothing for {seconds:.1f}s, over "
                   f"engine.step_timeout_s={self._heartbeat.timeout_s:g}s: it is stopped or frozen")
        self.proc.kill()  # a stopped process takes SIGKILL too; its ranks exit when it is gone

    def _on_process_exit(self) -> None:
        self._loop.remove_reader(self.proc.sentinel)
        if not self._join_lock.acquire(blocking=False):
            return  # shutdown() is reaping it
        try:
            self.proc.join(0)  # Process.join is not thread-safe: one reaper at a time
        finally:
            self._join_lock.release()
        if not self._stopping:
            # The FAILED frame (naming the dead rank) may still be in the socket: read it first.
            self._loop.call_later(EXIT_GRACE_S, lambda: self._fail(
                f"the engine-core process exited (exit code {self.proc.exitcode})"))

    def _fail(self, reason: str) -> None:
        if self._failure is not None or self._stopping:
            return
        self._failure = reason
        log.error("engine failed: %s", reason)
        error = EngineUnavailableError(f"engine failed: {reason}")
        for live in self._requests.values():
            live.stream.put(error)
        self._requests.clear()
        for fut in (*self._load_waiters.values(), *self._switch_waiters.values()):
            if not fut.done():
                fut.set_exception(error)
        callbacks, self._failure_callbacks = self._failure_callbacks, []
        for cb in callbacks:
            try:
                cb(reason)
            except Exception:
                log.exception("engine failure callback raised")

    def shutdown(self, timeout: float = 30.0) -> None:
        """From any thread: in-flight requests end with EngineUnavailableError, the core stops its
        ranks and exits; killed if it has not within `timeout`."""
        loop = self._loop
        if loop is None or self._stopping:
            return
        done = threading.Event()

        def stop_on_loop() -> None:
            self._stopping = True
            if self._heartbeat_watch is not None:
                self._heartbeat_watch.cancel()
            error = EngineUnavailableError("engine shut down")
            for live in self._requests.values():
                live.stream.put(error)
            self._requests.clear()
            for fut in (*self._load_waiters.values(), *self._switch_waiters.values()):
                if not fut.done():
                    fut.set_exception(error)
            if self.proc.exitcode is None:
                try:
                    self._push.send(ipc.pack([ipc.SHUTDOWN]), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            if self._reader is not None:  # nothing the core says now is needed
                self._reader.cancel()
            loop.call_soon(self._close_outputs)
            done.set()

        try:
            loop.call_soon_threadsafe(stop_on_loop)
            done.wait(5.0)
        except RuntimeError:  # the loop is closed
            self._stopping = True
        with self._join_lock:
            self.proc.join(timeout)
        if self.proc.exitcode is None:
            log.error("the engine core did not stop within %.0fs; killing it", timeout)
            self._kill()
        self._push.close(linger=0)  # the core is gone: SHUTDOWN was read or no longer matters
        self._sockets.close()
        if self.proc.exitcode != 0 and self._failure is None:
            raise RuntimeError(f"the engine-core process exited with code {self.proc.exitcode} while stopping")

    def _close_outputs(self) -> None:
        """On the loop, once the reader is cancelled: close the outputs socket and its context
        (an open one blocks the interpreter's exit, where the context is terminated)."""
        self._pull.close(linger=0)
        self._ctx.term()

    def _kill(self) -> None:
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(10)
        self._sockets.close()


def _load_tokenizer(app: AppConfig):
    from ..model.loader import load_tokenizer

    return load_tokenizer(app.model)


async def start_engine_process(app: AppConfig) -> EngineProcess:
    """The Engine that `python -m server` serves by default (server.engine_process=true)."""
    return await EngineProcess.start(app)
