"""The engine-core process: the default host of the CoreLoop (host.py), spawned by the
front end (core_handle.py) so that the step loop never shares a GIL with gRPC work.

This process ignores SIGINT and SIGTERM: a signal to the whole process group (Ctrl-C) must
drain like one to the front end, which tells this process when to stop (group_signals.py).
It exits 0 after SHUTDOWN, 1 when the engine failed (at once, after sending FAILED: the step
loop may be stuck in a collective with a dead rank), 2 for a start-up error, and on its own
if the front end vanishes.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

import zmq

from ..config import AppConfig
from .host import CoreEndpoints, serve_core
from .loop import EXIT_FAILED, EXIT_OK, WATCH_S, CoreLoop
from ..worker.group_signals import ignore_group_signals

log = logging.getLogger(__name__)


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
    from ..worker.distributed import resolve_device

    if resolve_device(app.parallel, 0).type == "cpu":
        import torch

        torch.set_num_threads(max(1, ((os.cpu_count() or 1) - 1) // app.parallel.ep_size))


def core_process_main(app: AppConfig, endpoints: CoreEndpoints, parent_pid: int, log_level: str) -> None:
    """Entry point of the engine-core process (multiprocessing, spawn)."""
    ignore_group_signals()  # the front end drains and then says SHUTDOWN (group_signals.py)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [core] %(name)s: %(message)s")
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    from .startup import build_engine_core

    def build():
        share_cpu(app)
        return build_engine_core(app)

    ctx = zmq.Context()
    run = serve_core(ctx, endpoints, build, on_fatal=lambda loop: _flush_and_exit(loop, EXIT_FAILED))
    if run.loop is None:  # START_FAILED is on its way out
        ctx.destroy(linger=5000)
        os._exit(run.code)
    run.loop.drain_outputs(5.0)
    if run.code != EXIT_OK:
        _flush_and_exit(run.loop, run.code)
    run.inputs.close(linger=0)  # its thread returned at SHUTDOWN
    run.outputs.close(linger=2000)  # frames still queued go out first
    ctx.term()
    # Finalizers registered with multiprocessing (routing=record closes its trace) run as at any
    # worker's exit; then leave without interpreter teardown, where native threads of torch or
    # zmq still alive could abort the process.
    from multiprocessing.util import _exit_function

    _exit_function()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(run.code)


class CoreProcess:
    """The front end's handle on the engine-core process it spawned."""

    join_after_failure_s = None  # a failed core process exits on its own (after stopping its ranks)

    def __init__(self, app: AppConfig, endpoints: CoreEndpoints) -> None:
        import multiprocessing

        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self.proc = multiprocessing.get_context("spawn").Process(
            target=core_process_main, name="epserve-core",
            args=(app, endpoints, multiprocessing.current_process().pid, level))
        self._join_lock = threading.Lock()  # Process.join is not thread-safe: one reaper at a time
        self.core = None  # the core lives in the other process

    def start(self) -> "CoreProcess":
        from ..worker.group_signals import spawning_signal_proof

        with spawning_signal_proof():  # it ignores Ctrl-C from its first instruction (group_signals.py)
            self.proc.start()
        return self

    name = "the engine-core process"

    @property
    def description(self) -> str:
        return f"{self.name} (pid {self.proc.pid})"

    @property
    def exitcode(self) -> int | None:
        return self.proc.exitcode

    def join(self, timeout: float | None) -> None:
        with self._join_lock:
            self.proc.join(timeout)

    def kill(self) -> None:
        """SIGKILL (a stopped process takes it too); its ranks exit when it is gone."""
        if self.proc.exitcode is None:
            self.proc.kill()
            self.join(10)

    def watch_exit(self, loop, callback) -> None:
        """`callback()` on `loop` once the process has exited (its sentinel turns readable)."""
        def on_exit() -> None:
            loop.remove_reader(self.proc.sentinel)
            if self._join_lock.acquire(blocking=False):  # else shutdown() is reaping it
                try:
                    self.proc.join(0)
                finally:
                    self._join_lock.release()
            callback()
        loop.add_reader(self.proc.sentinel, on_exit)

    def unwatch_exit(self, loop) -> None:
        if not loop.is_closed():
            loop.remove_reader(self.proc.sentinel)
