"""What the front end awaits from the engine core, in one table: live requests (their text side
and stream), expert-load and policy-switch calls, and confirmations of the input frames sent.

All of it lives on the client's event loop. `close(error)` ends everything at once: a failed
engine or a shutdown leaves no stream, call or confirmation waiting.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .output import RequestOutput
from .stream import RequestStream


@dataclass
class LiveRequest:
    output: RequestOutput
    stream: RequestStream
    abort_frame: int | None = None  # the input frame that carries its abort to the core


class RequestTable:
    def __init__(self) -> None:
        self.requests: dict[int, LiveRequest] = {}
        self.loads: dict[int, asyncio.Future] = {}  # call id -> ExpertLoadSnapshot
        self.switches: dict[int, asyncio.Future] = {}  # call id -> RoutingPolicyState
        self._confirmed = -1  # the newest input frame the core has applied
        self._confirming: list[tuple[int, asyncio.Future]] = []  # (frame number, waiter)

    # ---- confirmations ------------------------------------------------------------------------------
    def confirmation(self, frame: int) -> asyncio.Future | None:
        """A future set once the core applied input frame `frame` (None: it already has)."""
        if frame <= self._confirmed:
            return None
        fut = asyncio.get_running_loop().create_future()
        self._confirming.append((frame, fut))
        return fut

    def confirm(self, frame: int) -> None:
        self._confirmed = max(self._confirmed, frame)
        if self._confirming:
            waiting = []
            for number, fut in self._confirming:
                if number <= frame:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    waiting.append((number, fut))
            self._confirming = waiting

    def release_confirmations(self) -> None:
        """Nobody reads the core's frames now (the loop went away, or the engine stopped)."""
        for _, fut in self._confirming:
            if not fut.done():
                fut.set_result(None)
        self._confirming = []

    # ---- calls --------------------------------------------------------------------------------------
    @staticmethod
    def settle(futures: dict[int, asyncio.Future], call_ids, value) -> None:
        for call_id in call_ids:
            fut = futures.get(call_id)
            if fut is not None and not fut.done():
                if isinstance(value, BaseException):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)

    def close(self, error: BaseException) -> None:
        """Every stream and call ends with `error`; confirmations are released."""
        for live in self.requests.values():
            live.stream.put(error)
        self.requests.clear()
        for fut in (*self.loads.values(), *self.switches.values()):
            if not fut.done():
                fut.set_exception(error)
        self.release_confirmations()
