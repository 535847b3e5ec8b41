"""Run an HTTP request's generations on the engine: admission, chunks, and how a call ends.

The gRPC front end's bookkeeping is shared, not copied: calls count against the same
server.max_concurrent_streams slots (ActiveCalls), draining waits for them, a shutdown
past the grace period cuts them, the gRPC Abort RPC finds them by request id, and the same
Prometheus metrics count them (method label "http/completions" or "http/chat").
"""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

from server.engine.api import FinishReason, GenerationChunk, GenerationRequest
from server.rpc.metrics import observe_many

from .choices import ChoiceLayout
from .errors import HttpError

if TYPE_CHECKING:
    from server.rpc.service import GenerationService


class CallEnded(Exception):
    """The server ended the call (Abort, or shutdown past the grace period): finish `reason`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Tally:
    """Usage of one choice, kept as chunks pass (also what an ended call reports)."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish: FinishReason | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    extra: dict = field(default_factory=dict)


class Admission:
    """`async with Admission(service, peer, request_id):` holds one slot of ActiveCalls."""

    def __init__(self, service: "GenerationService", peer: str, request_id: str) -> None:
        self.service, self.peer, self.request_id = service, peer, request_id
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "Admission":
        service = self.service
        if not service.state.serving or service.engine is None:
            raise HttpError(503, service.state.unavailable_reason())
        calls = service.calls
        if calls.full() and not calls.make_room(asyncio.get_running_loop().time()):
            raise HttpError(429, f"too many concurrent generation calls (server.max_concurrent_streams="
                                 f"{calls.limit}); retry later")
        if calls.peer_full(self.peer):
            raise HttpError(429, f"too many concurrent generation calls on this connection "
                                 f"(server.max_calls_per_connection={calls.per_connection}); retry later")
        self.task = asyncio.current_task()
        calls.add(self.task, self.peer)
        calls.name(self.task, self.request_id)
        service.metrics.active_calls.inc()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.service.calls.remove(self.task)
        self.service.metrics.active_calls.dec()

    def ended(self) -> CallEnded | None:
        """Why the server cancelled this call, if it did (else the cancellation is the client's)."""
        calls = self.service.calls
        if self.task in calls.aborted:
            return CallEnded("abort", "ended by an Abort call")
        if self.task in calls.cut:
            return CallEnded("abort", calls.cut[self.task])
        return None


async def chunks_of(service: "GenerationService", requests: list[GenerationRequest], arrival: float,
                    tallies: list[Tally], layout: ChoiceLayout) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """(choice index, chunk) of every request as they come (`tallies`: one per choice). One
    request is iterated directly (the common case costs no task or queue); several run as
    tasks feeding one queue."""
    if len(requests) == 1:
        async with aclosing(service.engine.generate(requests[0])) as chunks:
            async for chunk in chunks:
                choice = layout.choice(0, chunk.index)
                _count(service, tallies[choice], chunk, arrival)
                yield choice, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, request: GenerationRequest) -> None:
        try:
            async with aclosing(service.engine.generate(request)) as chunks:
                async for chunk in chunks:
                    queue.put_nowait((i, chunk, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, None, exc))

    tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(requests)]
    try:
        left = layout.total  # every choice ends with its own finish reason
        while left:
            i, chunk, exc = await queue.get()
            if exc is not None:
                raise exc
            choice = layout.choice(i, chunk.index)
            _count(service, tallies[choice], chunk, arrival)
            left -= chunk.finish_reason is not None
            yield choice, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _count(service: "GenerationService", tally: Tally, chunk: GenerationChunk, arrival: float) -> None:
    metrics, n, now = service.metrics, len(chunk.token_ids), time.perf_counter()
    if n:
        if tally.last_token_at is None:
            metrics.ttft.observe(now - arrival)
            observe_many(metrics.itl, 0.0, n - 1)
            tally.first_token_at = now
        else:
            observe_many(metrics.itl, (now - tally.last_token_at) / n, n)
        tally.last_token_at = now
        metrics.generation_tokens.inc(n)
        tally.completion_tokens += n
    if chunk.finish_reason is not None:
        tally.finish = chunk.finish_reason
        if chunk.usage is not None:
            tally.completion_tokens = chunk.usage.completion_tokens
