"""CoreLink: the front end's live connection to one engine core, wherever it runs.

It owns what the client must not get wrong twice: the event loop in use, the one reader task
(each message but Failed and Heartbeat goes to `on_frame`), the sending of input frames, the judgement that the core is
gone — its exit (a process's sentinel; FAILED read first, EXIT_GRACE_S), its silence (no frame,
not even a heartbeat, for engine.step_timeout_s: liveness.py), a broken pipe — and the
shutdown sequence. A failure runs `on_failure(reason)` (the client ends every stream) and then
the failure callbacks, once.

The link follows whichever event loop uses it, one at a time: a loop that ends (tests run one
`asyncio.run` after another) hands the reader to the next one. Frames that came meanwhile wait
in the socket.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Callable

import zmq

from .liveness import CoreHeartbeat
from ..core.messages import Failed, Heartbeat, Shutdown, decode, encode

log = logging.getLogger(__name__)
EXIT_GRACE_S = 0.3  # after the core process exits, frames it sent just before still get read


class CoreLink:
    def __init__(self, host, pipes, step_timeout_s: float, on_frame: Callable[[object], None],
                 on_failure: Callable[[str], None], on_stop: Callable[[], None]) -> None:
        self.host, self.pipes = host, pipes
        self._on_frame, self._on_failure, self._on_stop = on_frame, on_failure, on_stop
        self.loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task | None = None
        # 0: no watchdog, no deadline (e.g. a debugger on the core)
        self._heartbeat = CoreHeartbeat(step_timeout_s, self._frame_waiting, self._on_silence) if step_timeout_s > 0 else None
        self._heartbeat_watch: asyncio.Task | None = None
        self.stopping = False
        self.failure: str | None = None
        self._failed = threading.Event()
        self._failure_callbacks: list[Callable[[str], None]] = []
        self._stop_lock = threading.Lock()

    # ---- the event loop in use ------------------------------------------------------------------
    def attach(self) -> tuple[asyncio.AbstractEventLoop, bool]:
        """-> (the caller's loop, whether it just took over: the caller flushes what it queued)."""
        loop = asyncio.get_running_loop()
        if loop is self.loop:
            return loop, False
        old = self.loop
        if old is not None and not old.is_closed():
            if old.is_running():
                raise RuntimeError("the engine client is in use by another running event loop")
            for task in (self._reader, self._heartbeat_watch):
                if task is not None:
                    task.cancel()
            self.host.unwatch_exit(old)
        self.loop = loop
        self._reader = loop.create_task(self._read())
        self.host.watch_exit(loop, self._on_core_exit)
        if self._heartbeat is not None:
            self._heartbeat.beat()  # frames that came while no loop read them are still waiting
            self._heartbeat_watch = loop.create_task(self._heartbeat.watch())
        return loop, True

    async def until(self, fut: asyncio.Future, timeout: float) -> bool:
        """Wait for `fut`, set by a frame yet to come, while a reader runs to see it (a loop that
        is going away cancels the reader). -> whether `fut` was set."""
        reader = self._reader
        if reader is None or reader.done():
            return False
        await asyncio.wait({fut, reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return fut.done()

    async def _read(self) -> None:
        reader = self.pipes.reader
        try:
            while True:
                message = decode(await reader.recv())
                if self._heartbeat is not None:
                    self._heartbeat.beat()
                if isinstance(message, Failed):
                    self.fail(message.reason)
                    return
                if not isinstance(message, Heartbeat):
                    self._on_frame(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken output path is a dead engine
            log.exception("reading the engine core's outputs failed")
            self.fail(f"reading the engine core's outputs failed: {exc}")

    # ---- sending ----------------------------------------------------------------------------------
    def send(self, frame: bytes, tries: int = 0) -> None:
        """On the loop in use: one input frame to the core, retried while the pipe connects."""
        try:
            self.pipes.push.send(frame, zmq.NOBLOCK)
        except zmq.Again:  # the pipe to the core is not (or no longer) connected
            if self.host.exitcode is None and tries < 500:
                self.loop.call_later(0.01, self.send, frame, tries + 1)
            else:
                self.fail(f"cannot reach the engine core (exit code {self.host.exitcode})")

    # ---- failure ----------------------------------------------------------------------------------
    def wait_failed(self, timeout: float | None = None) -> bool:
        return self._failed.wait(timeout)

    def add_failure_callback(self, callback: Callable[[str], None]) -> None:
        if self.failure is None:
            self._failure_callbacks.append(callback)
        else:
            callback(self.failure)

    def fail(self, reason: str) -> None:
        if self.failure is not None or self.stopping:
            return
        self.failure = reason
        log.error("engine failed: %s", reason)
        self._on_failure(reason)
        self._failed.set()
        callbacks, self._failure_callbacks = self._failure_callbacks, []
        for cb in callbacks:
            try:
                cb(reason)
            except Exception:
                log.exception("engine failure callback raised")

    def _frame_waiting(self) -> bool:
        return bool(self.pipes.pull.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def _on_silence(self, seconds: float) -> None:
        """The core sent nothing, not even a heartbeat, for too long: it does not run."""
        if self.stopping or self.failure is not None:
            return
        self.fail(f"{self.host.description} sent nothing for {seconds:.1f}s, over "
                  f"engine.step_timeout_s={self._heartbeat.timeout_s:g}s: it is stopped or frozen")
        self.host.kill()

    def _on_core_exit(self) -> None:
        if not self.stopping:  # the FAILED frame (naming the dead rank) may still be in the socket: read it first
            self.loop.call_later(EXIT_GRACE_S, lambda: self.fail(
                f"{self.host.name} exited (exit code {self.host.exitcode})"))

    # ---- shutdown -----------------------------------------------------------------------------------
    def shutdown(self, timeout: float) -> None:
        """From any thread: `on_stop` (the client ends its streams), SHUTDOWN to the core, which
        stops its ranks and ends; stopped forcibly if it has not within `timeout`."""
        with self._stop_lock:
            if self.stopping:
                return
            self.stopping = True
        loop = self.loop
        if loop is not None and loop.is_running() and not _runs_in_this_thread(loop):
            done = threading.Event()
            try:
                loop.call_soon_threadsafe(self._stop_reading, done)
                done.wait(5.0)
            except RuntimeError:  # the loop closed meanwhile
                self._stop_reading(None)
        else:
            self._stop_reading(None)
        host = self.host
        host.join(timeout if self.failure is None else min(timeout, host.join_after_failure_s or timeout))
        if host.exitcode is None:
            log.error("%s did not stop within %.0fs; stopping it forcibly", host.description, timeout)
            host.kill()
            host.join(10)
        self.pipes.close(term=host.exitcode is not None)  # SHUTDOWN was read, or no longer matters
        if host.exitcode != 0 and self.failure is None:
            raise RuntimeError(f"{host.description} exited with code {host.exitcode} while stopping")

    def _stop_reading(self, done: threading.Event | None) -> None:
        """On the loop (or with none running): end every stream and call, tell the core to stop,
        stop reading its frames."""
        if self._heartbeat_watch is not None:
            self._heartbeat_watch.cancel()
        self._on_stop()
        if self.host.exitcode is None:
            try:
                self.pipes.push.send(encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        if self._reader is not None:  # nothing the core says now is needed
            self._reader.cancel()
        if self.loop is not None and not self.loop.is_closed():
            self.host.unwatch_exit(self.loop)
        self.pipes.close_outputs()
        if done is not None:
            done.set()


def _runs_in_this_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
