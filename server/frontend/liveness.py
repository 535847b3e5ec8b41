"""The front end's own judgement that the engine-core process still runs.

The step watchdog (step_watchdog.py) lives in the engine-core process, so it cannot see that
process itself stopped: under SIGSTOP (or a frozen VM, a debugger on it) every thread of it
halts, nothing exits, no frame comes, and streams used to hang with health SERVING until the
process went on. The core's watcher thread sends a Heartbeat every messages.HEARTBEAT_S
whatever its step loop does (a long first step, a graph capture), so any frame counts as a
sign of life, and silence longer than `timeout_s` (engine.step_timeout_s, at least
MIN_TIMEOUT_S; engine.step_timeout_s=0 turns this off with the watchdog) means the process
is not running: the front end then fails the engine as when the process dies.

Before calling silence, the watch asks the socket whether a frame is waiting unread: when it
is the front end's own event loop that stalled, the core is not to blame.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from ..core.messages import HEARTBEAT_S

CHECK_S = 0.25  # how often the silence is measured
MIN_TIMEOUT_S = 4 * HEARTBEAT_S  # a shorter deadline would call a few late heartbeats a stopped process


class CoreHeartbeat:
    def __init__(self, timeout_s: float, frame_waiting: Callable[[], bool],
                 on_silence: Callable[[float], None]) -> None:
        self.timeout_s = max(float(timeout_s), MIN_TIMEOUT_S)
        self._frame_waiting, self._on_silence = frame_waiting, on_silence
        self._last = time.monotonic()

    def beat(self) -> None:
        """A frame came from the core."""
        self._last = time.monotonic()

    def silent_for(self) -> float:
        return time.monotonic() - self._last

    async def watch(self) -> None:
        """Until silence outlasts the deadline; then `on_silence(seconds)` once, and return."""
        while True:
            await asyncio.sleep(CHECK_S)
            silent = self.silent_for()
            if silent > self.timeout_s and not self._frame_waiting():
                self._on_silence(silent)
                return
