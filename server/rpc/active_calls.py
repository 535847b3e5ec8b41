"""Generation calls in progress: the concurrency limits, stalled readers, and what draining waits for.

Limits: `server.max_concurrent_streams` calls in all, and `server.max_calls_per_connection` per
client connection (gRPC's peer: address and port), so that one connection cannot take every
slot. Stalled readers: a call's write that has not completed for
`server.stalled_stream_timeout_s` means its client stopped reading (HTTP/2 flow control holds
the write); `watch_stalls` cancels such a call, which frees its slot and its sequence.

Stalled calls hold slots only while nobody else wants them: when the server is full,
`make_room` cancels the call whose write has waited longest, once it has waited
GIVE_WAY_AFTER_S, so the new call gets its slot. Clients that open many connections and never
read (which the per-connection limit cannot stop) can then keep slots from others for a few
seconds, not for the stall timeout over and over. A share per client address would not do it:
every client of a loopback server, and every client behind one proxy, has the same address.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter

log = logging.getLogger(__name__)
GIVE_WAY_AFTER_S = 2.0  # a write pending this long on a full server gives its slot to a new call


class ActiveCalls:
    """Tracks the handler task of each Generate / GenerateStream call."""

    def __init__(self, limit: int, per_connection: int | None = None) -> None:
        self.limit = limit
        self.per_connection = per_connection or limit
        self._tasks: dict[asyncio.Task, str] = {}  # task -> peer
        self._per_peer: Counter[str] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()
        self.cut: dict[asyncio.Task, str] = {}  # calls cancelled by the server -> why (UNAVAILABLE)
        self.stalled: dict[asyncio.Task, str] = {}  # calls cancelled for not reading -> why (CANCELLED)
        self.writing: dict[asyncio.Task, float] = {}  # loop time a write began, while it is pending
        self._request_ids: dict[asyncio.Task, str] = {}  # task -> request id, once validated
        self.aborted: set[asyncio.Task] = set()  # calls ended by Abort(request_id): finish CANCELLED

    def __len__(self) -> int:
        return len(self._tasks)

    def full(self) -> bool:
        """No slot free (calls cancelled for not reading are as good as gone)."""
        return len(self._tasks) - len(self.stalled) >= self.limit

    def make_room(self, now: float, min_wait_s: float = GIVE_WAY_AFTER_S) -> bool:
        """The server is full: cancel the call whose write has waited longest (loop time `now`)
        if it waited `min_wait_s` or more; True if one was cancelled."""
        waiting = [(since, task) for task, since in self.writing.items() if task not in self.stalled and not task.done()]
        if not waiting:
            return False
        since, task = min(waiting, key=lambda pair: pair[0])
        if now - since < min_wait_s:
            return False
        self.stalled[task] = (f"the client read nothing for {now - since:.1f}s while the server was full "
                              "(server.max_concurrent_streams); the server cancelled the stream to serve another call")
        log.warning("cancelling a stream from %s to make room: its client stopped reading", self._tasks.get(task, "?"))
        task.cancel()
        return True

    def peer_full(self, peer: str) -> bool:
        return self._per_peer[peer] >= self.per_connection

    def add(self, task: asyncio.Task, peer: str = "") -> None:
        self._tasks[task] = peer
        self._per_peer[peer] += 1
        self._idle.clear()

    def remove(self, task: asyncio.Task) -> None:
        peer = self._tasks.pop(task, None)
        if peer is not None:
            self._per_peer[peer] -= 1
            if not self._per_peer[peer]:
                del self._per_peer[peer]
        self.cut.pop(task, None)
        self.stalled.pop(task, None)
        self._request_ids.pop(task, None)
        self.aborted.discard(task)
        self.writing.pop(task, None)
        if not self._tasks:
            self._idle.set()

    def name(self, task: asyncio.Task, request_id: str) -> None:
        """Record the call's request id (the caller's or the server's), so Abort can find it."""
        if task in self._tasks:
            self._request_ids[task] = request_id

    def abort(self, request_id: str) -> int:
        """Cancel every call running with `request_id`; each ends with finish reason CANCELLED.
        A linear scan: Abort is rare, and a second index would be one more thing to keep right."""
        found = [t for t, rid in self._request_ids.items() if rid == request_id and not t.done()
                 and t not in self.aborted and t not in self.cut and t not in self.stalled]
        for task in found:
            self.aborted.add(task)
            task.cancel()
        return len(found)

    async def wait_idle(self, timeout: float) -> bool:
        """True when every call finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def cancel_all(self, reason: str) -> int:
        """Cancel the remaining calls; each ends with UNAVAILABLE and `reason`. Returns how many."""
        for task in self._tasks:
            self.cut[task] = reason
            task.cancel()
        return len(self._tasks)

    async def watch_stalls(self, timeout_s: float) -> None:
        """Forever: cancel every call whose pending write is older than `timeout_s`."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, timeout_s / 4))
            now = loop.time()
            for task, since in list(self.writing.items()):
                if now - since >= timeout_s and task not in self.stalled and not task.done():
                    self.stalled[task] = (f"the client read nothing for {timeout_s:g}s "
                                          "(server.stalled_stream_timeout_s); the server cancelled the stream")
                    log.warning("cancelling a stream from %s: its client stopped reading", self._tasks.get(task, "?"))
                    task.cancel()
