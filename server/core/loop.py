"""CoreLoop: the one driver of EngineCore, wherever the core runs.

The core runs in its own process (process.py, the default) or on a thread of the front
end's process (thread.py); both run this loop over the same two ZeroMQ pipes, and only
the transport differs (ipc:// or inproc://). Four threads, so that the step loop never waits
on messages:
  * input thread: receive a frame, apply its adds and aborts to the core at once (the core is
    thread-safe for inputs: a cancelled sequence is freed even while a step runs), register
    expert-load calls and policy switches, wake the step loop, and confirm the frame with the
    queue's new stats (the front end waits for that before it reports a cancelled stream closed);
  * step loop (the caller's thread): while there is work, `core.step()`; queue its outputs;
  * output thread: send the queued frames in order;
  * watcher: fail the loop the moment an EP rank exits or a step outruns the step watchdog
    (a hung rank: step_watchdog.py), even while the step loop is stuck in a collective, and
    send a Heartbeat every messages.HEARTBEAT_S whatever the step loop does: a watchdog
    cannot see its own process stopped, so the front end judges that by the silence
    (frontend/liveness.py).
Stats go out with every frame that changes them, snapshot and queueing under one lock, so the
front end never reads an older snapshot after a newer one.
"""
from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
import traceback
from typing import Callable

import zmq

from ..config import ConfigError
from ..engine.api import ResourceExhaustedError
from .engine_core import EngineCore
from .messages import (
    HEARTBEAT_S, Failed, Heartbeat, InputFrame, Rejected, RoutingReply, Shutdown, Stats, StepFrame, SwitchCall, encode,
    decode,
)
from ..worker.policy_switch import refuse_file_policies

log = logging.getLogger(__name__)
IDLE_STEP_S = 2.0  # an idle engine with EP workers steps this often (a heartbeat plan to every rank)
WATCH_S = 0.2  # dead-rank and hung-step polling period
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class CoreLoop:
    """Drives one EngineCore between an input socket (PULL) and an output socket (PUSH).

    `on_fatal` runs on the watcher thread after a dead rank or a hung step failed the loop:
    the process host exits at once (the step loop may never come back from a collective);
    the thread host passes None and lets the front end's shutdown stop the ranks."""

    def __init__(self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket,
                 on_fatal: "Callable[[CoreLoop], None] | None" = None) -> None:
        self.core = core
        self.inputs, self.outputs = inputs, outputs
        self.on_fatal = on_fatal
        self.out: "queue.Queue[bytes | None]" = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._load_calls: dict[int, int] = {}  # core ticket -> front-end call id
        self._switch_calls: list[int] = []  # front-end call ids of the policy switch not yet applied
        self._lock = threading.Lock()
        self._out_lock = threading.Lock()  # a stats snapshot and its frame's place in the queue, together
        self.failure: str | None = None
        self._input_thread = threading.Thread(target=self._read_inputs, name="epserve-core-in", daemon=True)
        self._sender = threading.Thread(target=self._send_outputs, name="epserve-core-out", daemon=True)
        self._sender.start()

    def send(self, frame: bytes) -> None:
        self.out.put(frame)

    # ---- input thread ---------------------------------------------------------------------------
    def _read_inputs(self) -> None:
        try:
            self._serve_inputs()
        except BaseException as exc:  # noqa: BLE001 - without inputs the core is useless
            log.error("engine input thread failed:\n%s", traceback.format_exc())
            self.fail(f"engine input thread failed: {exc}")
            self._wake.set()

    def _serve_inputs(self) -> None:
        while True:
            message = decode(self.inputs.recv())
            if isinstance(message, Shutdown):
                self._stop.set()
                self._wake.set()
                return
            self._apply(message)

    def _apply(self, frame: InputFrame) -> None:
        if frame.aborts:
            self.core.abort(frame.aborts)
        for add in frame.adds:
            self._add(add.request())
        for switch in frame.switches:
            self._switch(switch)
        for load in frame.loads:
            with self._lock:
                self._load_calls[self.core.request_expert_load(load.reset)] = load.call_id
        self._wake.set()
        with self._out_lock:
            self.out.put(encode(Stats(self.core.stats(), frame.number)))

    def _add(self, req) -> None:
        try:
            self.core.add_request(req)
        except ResourceExhaustedError as exc:
            self.out.put(encode(Rejected(req.req_id, "exhausted", str(exc))))
        except (AssertionError, ValueError) as exc:  # the front end validates: this is a bug there
            log.error("request %d refused by the core: %s", req.req_id, exc)
            self.out.put(encode(Rejected(req.req_id, "invalid", str(exc))))

    def _switch(self, switch: SwitchCall) -> None:
        """Queue a policy switch for the next step; a mapping rank 0 cannot build is refused now."""
        with self._lock:
            self._switch_calls.append(switch.call_id)
        try:
            refuse_file_policies(switch.routing)  # a switch from the API never gets the server's file access
            self.core.switch_routing_policy(switch.routing)
        except Exception as exc:  # noqa: BLE001 - ConfigError names the key; anything else is reported too
            with self._lock:
                self._switch_calls.remove(switch.call_id)
            reason = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            self.out.put(encode(RoutingReply([switch.call_id], False, reason)))

    # ---- step loop (the caller's thread) -----------------------------------------------------------
    def run(self) -> int:
        """Step until SHUTDOWN (-> EXIT_OK, ranks stopped) or a failure (-> EXIT_FAILED, ranks
        left to the host: they may be stuck in a collective)."""
        self._input_thread.start()
        threading.Thread(target=self._watch_ranks, name="epserve-core-watch", daemon=True).start()
        core = self.core
        try:
            core.bind_thread()
            while not self._stop.is_set() and self.failure is None:
                self._wake.clear()
                if not core.has_work():
                    self._wake.wait(IDLE_STEP_S)
                    if self._stop.is_set() or self.failure is not None:
                        break
                outputs = core.step()
                if outputs.is_empty:
                    continue
                with self._lock:
                    calls = [self._load_calls.pop(t) for t in outputs.load_tickets if t in self._load_calls]
                with self._out_lock:
                    self.out.put(encode(StepFrame.of(outputs, core.stats(), calls)))
                if outputs.routing is not None:
                    with self._lock:
                        switched, self._switch_calls = self._switch_calls, []
                    self.out.put(encode(RoutingReply(switched, True, pickle.dumps(core.routing_policy()))))
        except BaseException as exc:  # noqa: BLE001 - any failure of a step is fatal
            log.error("engine step failed:\n%s", traceback.format_exc())
            self.fail(core.dead_rank_within(1.0) or f"engine step failed: {exc}")
        if self.failure is not None:
            return EXIT_FAILED
        core.shutdown(graceful=True)
        return EXIT_OK

    def _watch_ranks(self) -> None:
        heartbeat = encode(Heartbeat())
        last_beat = 0.0
        while not self._stop.is_set() and self.failure is None:
            dead = self.core.dead_rank() or self.core.hung_step()
            if dead is not None:
                self.fail(dead)
                if self.on_fatal is not None:
                    self.on_fatal(self)
                return
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                self.out.put(heartbeat)
                last_beat = time.monotonic()
            time.sleep(WATCH_S)

    def fail(self, reason: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        log.error("engine failed: %s", reason)
        self.out.put(encode(Failed(reason)))
        self._wake.set()

    # ---- output thread ----------------------------------------------------------------------------
    def _send_outputs(self) -> None:
        while (frame := self.out.get()) is not None:
            try:
                self.outputs.send(frame, copy=False)
            except zmq.ZMQError as exc:  # the front end closed its end (context terminated at shutdown)
                log.warning("engine output socket closed (%s): %d frame(s) not delivered", exc, 1 + self.out.qsize())
                return

    def drain_outputs(self, timeout: float = 5.0) -> bool:
        """Send what is queued, then stop the output thread. -> whether it finished in time."""
        self.out.put(None)
        self._sender.join(timeout)
        return not self._sender.is_alive()

    def wait_inputs_closed(self, timeout: float) -> bool:
        """The input thread returns at SHUTDOWN: -> whether it has (its socket may then be closed)."""
        if self._input_thread.ident is not None:
            self._input_thread.join(timeout)
        return not self._input_thread.is_alive()
