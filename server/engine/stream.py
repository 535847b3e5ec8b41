"""Hand-off of one request's chunks from the engine thread to its asyncio consumer.

The engine thread never touches asyncio objects directly: it schedules `_deliver` on the
consumer's loop with call_soon_threadsafe. A consumer that falls behind gets the chunks that
piled up merged into one (same tokens, concatenated text), so a slow reader costs no memory
per step beyond its pending tokens.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Union

from .api import GenerationChunk

Item = Union[GenerationChunk, BaseException]


class RequestStream:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Item] = deque()
        self._ready = asyncio.Event()

    def put(self, item: Item) -> bool:
        """From any thread. False if the consumer's loop is gone (caller should cancel)."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
            return True
        except RuntimeError:  # loop closed
            return False

    def _deliver(self, item: Item) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> GenerationChunk:
        """Next chunk (pending chunks merged); raises an error the engine delivered."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        first = self._items.popleft()
        if isinstance(first, BaseException):
            raise first
        merged = first
        while self._items and not isinstance(self._items[0], BaseException) and merged.finish_reason is None:
            merged = merge_chunks(merged, self._items.popleft())
        return merged


def merge_chunks(a: GenerationChunk, b: GenerationChunk) -> GenerationChunk:
    logprobs = None
    if a.logprobs is not None or b.logprobs is not None:
        logprobs = (a.logprobs or ()) + (b.logprobs or ())
    return GenerationChunk(
        token_ids=a.token_ids + b.token_ids,
        text=a.text + b.text,
        logprobs=logprobs,
        finish_reason=b.finish_reason,
        usage=b.usage,
    )


def settle_future(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value) -> None:
    """From any thread: set `fut`'s result (or exception, if `value` is one) on its loop."""
    def settle() -> None:
        if fut.done():
            return
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop is gone
        pass
