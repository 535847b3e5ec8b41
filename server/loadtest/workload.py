"""One load run: N concurrent streams of exactly M new tokens each, some cancelled on purpose.

Every stream asks for `ignore_eos` so its token count is exact: a stream that is not cancelled
must end with finish_reason LENGTH, `usage.completion_tokens == M` and M token ids received.
Which streams are cancelled, and after how many received tokens, comes from a seeded RNG so a
failing storm can be replayed. A cancel point of 0 closes the stream right after sending it
(it may still be queued on the server: that path must free it too).
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from clients import AsyncClient, EpserveError, FinishReason


@dataclass(frozen=True)
class LoadSpec:
    streams: int = 256
    new_tokens: int = 64
    prompt_tokens: int = 8
    cancel_fraction: float = 0.0  # share of streams closed early, at a seeded random point
    slow_readers: int = 0  # streams that sleep `slow_read_delay_s` before reading each message
    slow_read_delay_s: float = 0.2
    seed: int = 0
    stream_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.streams < 1 or self.new_tokens < 1 or self.prompt_tokens < 1:
            raise ValueError(f"streams, new_tokens and prompt_tokens must be >= 1: {self}")
        if not 0.0 <= self.cancel_fraction <= 1.0:
            raise ValueError(f"cancel_fraction must be in [0, 1], got {self.cancel_fraction}")
        if self.slow_readers < 0 or self.slow_readers + round(self.cancel_fraction * self.streams) > self.streams:
            raise ValueError(f"slow_readers + cancelled streams exceed the {self.streams} streams")


@dataclass(frozen=True)
class StreamPlan:
    index: int
    prompt: tuple[int, ...]
    cancel_after: int | None  # close after this many tokens received; None: read to the end
    slow: bool


@dataclass(frozen=True)
class StreamResult:
    plan: StreamPlan
    tokens: int  # token ids received
    messages: int  # stream messages received
    ttft_s: float | None  # client side: call sent -> first message with a token
    total_s: float  # call sent -> last message (or the cancel, or the error)
    finish: FinishReason | None  # None when cancelled by us, or on error
    usage_tokens: int | None  # usage.completion_tokens of the final message
    error: str | None  # "CODE: details" of an EpserveError, or a local check that failed

    @property
    def cancelled(self) -> bool:
        return self.finish is None and self.error is None


@dataclass(frozen=True)
class RunResult:
    spec: LoadSpec
    streams: tuple[StreamResult, ...]
    wall_s: float  # first call sent -> last stream done

    @property
    def completed(self) -> list[StreamResult]:
        """Streams that ended with their final message and passed the count check."""
        return [r for r in self.streams if r.finish is not None and r.error is None]

    @property
    def errors(self) -> list[StreamResult]:
        return [r for r in self.streams if r.error is not None]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.streams)


def plan_streams(spec: LoadSpec, vocab_size: int) -> list[StreamPlan]:
    """Seeded: prompts, which streams are cancelled and when, which read slowly."""
    rng = random.Random(spec.seed)
    order = list(range(spec.streams))
    rng.shuffle(order)
    n_cancel = round(spec.cancel_fraction * spec.streams)
    cancelled = {i: rng.randrange(0, spec.new_tokens) for i in order[:n_cancel]}
    slow = set(order[n_cancel:n_cancel + spec.slow_readers])
    return [
        StreamPlan(index=i, prompt=tuple(rng.randrange(vocab_size) for _ in range(spec.prompt_tokens)),
                   cancel_after=cancelled.get(i), slow=i in slow)
        for i in range(spec.streams)
    ]


async def run_stream(client: AsyncClient, plan: StreamPlan, spec: LoadSpec, start: asyncio.Event) -> StreamResult:
    await start.wait()
    sent = time.perf_counter()
    tokens = messages = 0
    ttft: float | None = None
    finish = usage = error = None
    stream = client.stream(list(plan.prompt), max_new_tokens=spec.new_tokens, ignore_eos=True,
                           request_id=f"load-{spec.seed}-{plan.index}", timeout=spec.stream_timeout_s)
    try:
        if plan.cancel_after == 0:
            await stream.aclose()
        else:
            async for chunk in stream:
                messages += 1
                tokens += len(chunk.token_ids)
                if ttft is None and chunk.token_ids:
                    ttft = time.perf_counter() - sent
                if chunk.finish_reason is not None:
                    finish, usage = chunk.finish_reason, chunk.usage.completion_tokens if chunk.usage else None
                elif plan.cancel_after is not None and tokens >= plan.cancel_after:
                    await stream.aclose()
                    break
                if plan.slow:
                    await asyncio.sleep(spec.slow_read_delay_s)
    except EpserveError as exc:
        error = str(exc)
    finally:
        await stream.aclose()
    if finish is not None and error is None:
        error = _check_complete(tokens, finish, usage, spec.new_tokens)
    return StreamResult(plan, tokens, messages, ttft, time.perf_counter() - sent, finish, usage, error)


def _check_complete(tokens: int, finish: FinishReason, usage: int | None, want: int) -> str | None:
    if finish is not FinishReason.LENGTH or tokens != want or usage != want:
        return f"expected {want} tokens and finish LENGTH, got {tokens} tokens (usage {usage}), finish {finish}"
    return None


async def run_load(client: AsyncClient, spec: LoadSpec, vocab_size: int) -> RunResult:
    """All streams are created first and released together, so they really are concurrent."""
    start = asyncio.Event()
    tasks = [asyncio.create_task(run_stream(client, p, spec, start)) for p in plan_streams(spec, vocab_size)]
    await asyncio.sleep(0)
    began = time.perf_counter()
    start.set()
    results = await asyncio.gather(*tasks)
    return RunResult(spec, tuple(results), time.perf_counter() - began)
