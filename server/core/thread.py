"""The engine core on a thread of the front end's process (`server.engine_process=false`, and
what tests and tools that look inside the core start).

The thread runs the same host as the engine-core process (host.py: connect, build,
READY, CoreLoop) over inproc:// pipes, so the front end's client cannot tell the two apart.
What a process gets from exiting, the thread does by hand: after a failure it stops the
ranks without waiting on them, and it closes its sockets once the front end said SHUTDOWN.
`core` is the EngineCore itself, for tests and tools that inspect the scheduler, the
executor or the EPLB reports.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from .engine_core import EngineCore
from .host import CoreEndpoints, CoreRun, serve_core
from .loop import EXIT_OK

log = logging.getLogger(__name__)
SHUTDOWN_WAIT_S = 60.0  # after a failure, how long the thread waits for the front end's SHUTDOWN
JOIN_AFTER_FAILURE_S = 2.0  # a failed core's step may never return (a hung rank): stop its ranks sooner


class CoreThread:
    join_after_failure_s = JOIN_AFTER_FAILURE_S

    def __init__(self, ctx, endpoints: CoreEndpoints, build_core: Callable[[], EngineCore]) -> None:
        """`ctx`: the front end's zmq.Context (inproc:// pipes need the one context)."""
        self._ctx, self._endpoints, self._build_core = ctx, endpoints, build_core
        self.core: EngineCore | None = None
        self._run: CoreRun | None = None
        self._thread = threading.Thread(target=self._main, name="epserve-core", daemon=True)

    def start(self) -> "CoreThread":
        self._thread.start()
        return self

    name = description = "the engine-core thread"

    def _build(self) -> EngineCore:
        self.core = self._build_core()
        return self.core

    def _main(self) -> None:
        run = self._run = serve_core(self._ctx, self._endpoints, self._build)
        if run.loop is not None:
            run.loop.drain_outputs(5.0)
            if run.code != EXIT_OK:
                run.loop.core.shutdown(graceful=False)
            if not run.loop.wait_inputs_closed(SHUTDOWN_WAIT_S):
                log.warning("the front end sent no SHUTDOWN; leaving the engine core's sockets open")
                return
        run.inputs.close(linger=0)
        run.outputs.close(linger=2000)

    # ---- what the front end's client asks of any core host -------------------------------------------
    @property
    def exitcode(self) -> int | None:
        """None while the thread runs; then the loop's code (0 after SHUTDOWN)."""
        if self._thread.is_alive() or self._thread.ident is None:
            return None
        return self._run.code if self._run is not None else 1

    def join(self, timeout: float | None) -> None:
        self._thread.join(timeout)

    def kill(self) -> None:
        """Stop the ranks now: a step stuck in a collective with them then fails, and the loop ends."""
        if self.core is not None:
            self.core.shutdown(graceful=False)

    def watch_exit(self, loop, callback) -> None:
        """A thread has no exit to watch: it reports its failures on the pipe (FAILED)."""

    def unwatch_exit(self, loop) -> None:
        pass
