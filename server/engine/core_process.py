"""The engine-core process: EngineCore (rank 0's scheduler and model runner, and the EP ranks
it spawns or joins) stepping as fast as it can, with the front end at the far end of ZeroMQ.

Three threads, so that the step loop never waits on messages:
  * input thread: receive a frame, apply its adds and aborts to the core at once (the core is
    thread-safe for inputs: a cancelled sequence is freed even while a step runs), register
    expert-load calls, wake the step loop;
  * step loop (main thread): while there is work, `core.step()`; queue its StepOutputs;
  * output thread: pack each StepOutputs into one msgpack frame and send it.
A watcher thread fails the process the moment an EP rank exits, or a step outruns the step
watchdog's limit (a hung rank: step_watchdog.py), even while the step loop is stuck in a
collective; it kills the ranks and exits without waiting for that step. It also sends a
HEARTBEAT frame every ipc.HEARTBEAT_S: a watchdog cannot see its own process stopped
(SIGSTOP, a frozen VM), so the front end judges that by the silence (core_liveness.py). This process ignores SIGINT and SIGTERM: a signal to the whole process
group (Ctrl-C) must drain like one to the front end, which tells this process when to stop.
It exits 0 after SHUTDOWN, 1 when the engine failed, and on its own if the front end vanishes.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import traceback

import zmq

from ..config import AppConfig, ConfigError
from . import ipc
from .api import ResourceExhaustedError
from .core import EngineCore
from .group_signals import ignore_group_signals
from .policy_switch import refuse_file_policies

log = logging.getLogger(__name__)
HEARTBEAT_S = 2.0  # idle distributed engines ping their workers this often
WATCH_S = 0.2  # dead-rank and orphan polling period
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class CoreLoop:
    def __init__(self, core: EngineCore, inputs: zmq.Socket) -> None:
        self.core = core
        self.inputs = inputs
        self.out: "queue.Queue[bytes | None]" = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._load_calls: dict[int, int] = {}  # core ticket -> front-end call id
        self._switch_calls: list[int] = []  # front-end call ids of the policy switch not yet applied
        self._lock = threading.Lock()
        self.failure: str | None = None

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
            frame = ipc.unpack(self.inputs.recv())
            if frame[0] == ipc.SHUTDOWN:
                self._stop.set()
                self._wake.set()
                return
            _, adds, aborts, loads, switches = frame
            if aborts:
                self.core.abort(aborts)
            for fields in adds:
                self._add(fields)
            for call_id, routing in switches:
                self._switch(call_id, routing)
            for call_id, reset in loads:
                with self._lock:
                    self._load_calls[self.core.request_expert_load(reset)] = call_id
            self._wake.set()
            if aborts or adds:
                self.out.put(ipc.pack([ipc.STATS, list(_stats_fields(self.core))]))

    def _add(self, fields: list) -> None:
        req = ipc.request_from_fields(fields)
        try:
            self.core.add_request(req)
        except ResourceExhaustedError as exc:
            self.out.put(ipc.pack([ipc.REJECTED, req.req_id, "exhausted", str(exc)]))
        except (AssertionError, ValueError) as exc:  # the front end validates: this is a bug there
            log.error("request %d refused by the core: %s", req.req_id, exc)
            self.out.put(ipc.pack([ipc.REJECTED, req.req_id, "invalid", str(exc)]))

    def _switch(self, call_id: int, routing: dict) -> None:
        """Queue a policy switch for the next step; a mapping rank 0 cannot build is refused now."""
        with self._lock:
            self._switch_calls.append(call_id)
        try:
            refuse_file_policies(routing)  # a switch from the API never gets the server's file access
            self.core.switch_routing_policy(routing)
        except Exception as exc:  # noqa: BLE001 - ConfigError names the key; anything else is reported too
            with self._lock:
                self._switch_calls.remove(call_id)
            reason = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            self.out.put(ipc.pack([ipc.ROUTING, [call_id], False, reason]))

    # ---- step loop (main thread) ------------------------------------------------------------------
    def run(self) -> int:
        threading.Thread(target=self._read_inputs, name="epserve-core-in", daemon=True).start()
        threading.Thread(target=self._watch_ranks, name="epserve-core-watch", daemon=True).start()
        core = self.core
        try:
            core.bind_thread()
            while not self._stop.is_set() and self.failure is None:
                self._wake.clear()
                if not core.has_work():
                    self._wake.wait(HEARTBEAT_S)
                    if self._stop.is_set() or self.failure is not None:
                        break
                outputs = core.step()
                if outputs.is_empty:
                    continue
                with self._lock:
                    calls = [self._load_calls.pop(t) for t in outputs.load_tickets if t in self._load_calls]
                self.out.put(ipc.step_frame(outputs, core.stats(), calls))
                if outputs.routing is not None:
                    with self._lock:
                        switched, self._switch_calls = self._switch_calls, []
                    self.out.put(ipc.pack([ipc.ROUTING, switched, True, ipc.dumps(core.routing_policy())]))
        except BaseException as exc:  # noqa: BLE001 - any failure of a step is fatal
            log.error("engine step failed:\n%s", traceback.format_exc())
            self.fail(core.dead_rank_within(1.0) or f"engine step failed: {exc}")
        if self.failure is not None:
            return EXIT_FAILED
        core.shutdown(graceful=True)
        return EXIT_OK

    def _watch_ranks(self) -> None:
        heartbeat = ipc.pack([ipc.HEARTBEAT])
        last_beat = 0.0
        while not self._stop.is_set() and self.failure is None:
            dead = self.core.dead_rank() or self.core.hung_step()
            if dead is not None:
                self.fail(dead)
                # The step loop may sit in a collective that never returns: do not wait for it.
                _flush_and_exit(self, EXIT_FAILED)
            if time.monotonic() - last_beat >= ipc.HEARTBEAT_S:
                self.out.put(heartbeat)
                last_beat = time.monotonic()
            time.sleep(WATCH_S)

    def fail(self, reason: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        log.error("engine failed: %s", reason)
        self.out.put(ipc.pack([ipc.FAILED, reason]))


def _stats_fields(core: EngineCore) -> tuple:
    s = core.stats()
    return (s.running, s.waiting, s.kv_blocks_used, s.kv_blocks_total, s.steps)


def _send_outputs(out_sock: zmq.Socket, frames: "queue.Queue[bytes | None]", done: threading.Event) -> None:
    while (frame := frames.get()) is not None:
        out_sock.send(frame, copy=False)
    done.set()


def _flush_and_exit(loop: CoreLoop | None, code: int, wait_s: float = 2.0) -> None:
    """Send what is queued (the FAILED frame), stop the ranks without waiting on them, exit."""
    if loop is not None:
        deadline = time.monotonic() + wait_s
        while not loop.out.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the zmq I/O thread writes the last frame; os._exit would cut it off
        stopper = threading.Thread(target=loop.core.shutdown, args=(False,), daemon=True)
        stopper.start()
        stopper.join(5.0)
    logging.shutdown()
    os._exit(code)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_S * 5)
    log.error("the front end (pid %d) is gone; the engine core exits", parent_pid)
    _flush_and_exit(None, EXIT_FAILED)


def share_cpu(app: AppConfig) -> None:
    """On CPU, leave one core to the front end: a torch thread team that owns every core stalls
    at each barrier whenever the front end (tokenizing, writing streams) takes one of them."""
    from .distributed import resolve_device

    if resolve_device(app.parallel, 0).type == "cpu":
        import torch

        torch.set_num_threads(max(1, ((os.cpu_count() or 1) - 1) // app.parallel.ep_size))


def core_process_main(app_dict: dict, sockets: dict, parent_pid: int, log_level: str) -> None:
    """Entry point of the engine-core process (multiprocessing, spawn)."""
    ignore_group_signals()  # the front end drains and then says SHUTDOWN (group_signals.py)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [core] %(name)s: %(message)s")
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    ctx = zmq.Context()
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a burst: frames are few and small
    out_sock.setsockopt(zmq.LINGER, 5000)
    out_sock.connect(sockets["outputs"])
    in_sock = ctx.socket(zmq.PULL)  # connected now, so that it is up by the time READY is read
    in_sock.connect(sockets["inputs"])
    from .launcher import EngineStartError, build_engine_core

    try:
        app = AppConfig.from_dict(app_dict)
        share_cpu(app)
        core = build_engine_core(app)
    except (ConfigError, EngineStartError, FileNotFoundError) as exc:
        kind = "config" if isinstance(exc, ConfigError) else "start"
        out_sock.send(ipc.pack([ipc.START_FAILED, kind, str(exc)]))
        ctx.destroy(linger=5000)  # the frame goes out before the exit
        os._exit(EXIT_CONFIG)
    except BaseException as exc:  # noqa: BLE001 - reported to the front end, then exit
        log.error("engine start-up failed:\n%s", traceback.format_exc())
        out_sock.send(ipc.pack([ipc.START_FAILED, "error", f"{type(exc).__name__}: {exc}"]))
        ctx.destroy(linger=5000)
        os._exit(EXIT_FAILED)
    loop = CoreLoop(core, in_sock)
    sent = threading.Event()
    threading.Thread(target=_send_outputs, args=(out_sock, loop.out, sent), name="epserve-core-out",
                     daemon=True).start()
    loop.out.put(ipc.pack([ipc.READY, ipc.dumps(core.model_info()), ipc.dumps(core.routing_policy())]))
    code = loop.run()
    loop.out.put(None)
    sent.wait(5.0)
    if code != EXIT_OK:
        _flush_and_exit(loop, code)
    in_sock.close(linger=0)  # its thread returned at SHUTDOWN
    out_sock.close(linger=2000)  # frames still queued go out first
    ctx.term()
    # Finalizers registered with multiprocessing (routing=record closes its trace) run as at any
    # worker's exit; then leave without interpreter teardown, where native threads of torch or
    # zmq still alive could abort the process.
    from multiprocessing.util import _exit_function

    _exit_function()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
