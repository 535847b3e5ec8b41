"""One request's chunks on their way to its asyncio consumer, merged into stream messages.

The producer (the client's reader task, client.py) puts chunks on the stream from the
consumer's own event loop. `get` returns every token that is ready,
merged into one chunk, so a consumer that falls behind (a slow reader, a busy loop) costs one
message, not one per token. With `interval` > 1 the consumer is woken only once that many
tokens are pending, or the request ended, or the first token is there (TTFT does not grow);
the token sequence the client sees is the same whatever the interval.
"""
from __future__ import annotations

import asyncio
from collections import deque
from itertools import chain
from typing import Union

from ..engine.api import GenerationChunk

Item = Union[GenerationChunk, BaseException]


class RequestStream:
    def __init__(self, interval: int = 1) -> None:
        self.interval = max(1, int(interval))
        self._items: deque[Item] = deque()
        self._pending_tokens = 0
        self._started = False  # the first message went out
        self._waiter: asyncio.Future | None = None

    def put(self, item: Item) -> None:
        """On the consumer's loop: queue a chunk or an error; wake the consumer if a message is due."""
        self._items.append(item)
        if isinstance(item, GenerationChunk):
            self._pending_tokens += len(item.token_ids)
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self._due():
            waiter.set_result(None)

    def _due(self) -> bool:
        if not self._items:
            return False
        if not self._started or self._pending_tokens >= self.interval:
            return True
        last = self._items[-1]
        return isinstance(last, BaseException) or last.finish_reason is not None

    async def get(self) -> GenerationChunk:
        """Every ready token as one chunk; raises an error the producer delivered (after the
        chunks that came before it)."""
        while not self._due():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        first = self._items.popleft()
        if isinstance(first, BaseException):
            raise first
        parts = [first]
        while (self._items and not isinstance(self._items[0], BaseException) and parts[-1].finish_reason is None
               and self._items[0].index == first.index):  # n > 1: one sequence's chunks per message
            parts.append(self._items.popleft())
        self._started = True
        self._pending_tokens = sum(len(c.token_ids) for c in self._items if isinstance(c, GenerationChunk))
        return parts[0] if len(parts) == 1 else merge_chunks(parts)


def merge_chunks(parts: list[GenerationChunk]) -> GenerationChunk:
    """Consecutive chunks of one request as one (the last one's finish reason and usage)."""
    logprobs = None
    if any(c.logprobs is not None for c in parts):
        logprobs = tuple(chain.from_iterable(c.logprobs or () for c in parts))
    tops = None
    if any(c.top_logprobs is not None for c in parts):
        tops = tuple(chain.from_iterable(c.top_logprobs or () for c in parts))
    routed = None
    if any(c.routed_experts is not None for c in parts):
        routed = b"".join(c.routed_experts or b"" for c in parts)
    last = parts[-1]
    return GenerationChunk(
        token_ids=tuple(chain.from_iterable(c.token_ids for c in parts)),
        text="".join(c.text for c in parts),
        logprobs=logprobs,
        top_logprobs=tops,
        prompt_logprobs=parts[0].prompt_logprobs,
        prompt_top_logprobs=parts[0].prompt_top_logprobs,
        finish_reason=last.finish_reason,
        usage=last.usage,
        routed_experts=routed,
        index=last.index,
    )
