"""Generation calls in progress: the concurrency limit, and what draining waits for."""
from __future__ import annotations

import asyncio


class ActiveCalls:
    """Tracks the handler task of each Generate / GenerateStream call."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._tasks: set[asyncio.Task] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.cut: dict[asyncio.Task, str] = {}  # calls cancelled by the server -> why (UNAVAILABLE)

    def __len__(self) -> int:
        return len(self._tasks)

    def full(self) -> bool:
        return len(self._tasks) >= self.limit

    def add(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        self._idle.clear()

    def remove(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.cut.pop(task, None)
        if not self._tasks:
            self._idle.set()

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
