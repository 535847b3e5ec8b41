"""Retry with exponential backoff, on UNAVAILABLE only, inside one overall deadline.

Only UNAVAILABLE is retried: it means the request never reached a working engine (server
loading, draining, restarting, or not reachable), so sending it again cannot duplicate work.
Streams are retried only before their first message, never after tokens have arrived.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Iterator

import grpc


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # first try included; 1 disables retries
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"RetryPolicy has an impossible setting: {self}")

    def delays(self) -> Iterator[float]:
        """Sleep before retry 1, 2, ... (max_attempts - 1 values)."""
        delay = self.initial_backoff_s
        for _ in range(self.max_attempts - 1):
            yield min(delay, self.max_backoff_s) * random.uniform(1 - self.jitter, 1 + self.jitter)
            delay *= self.multiplier


NO_RETRY = RetryPolicy(max_attempts=1)


def is_retryable(exc: grpc.RpcError) -> bool:
    return hasattr(exc, "code") and exc.code() == grpc.StatusCode.UNAVAILABLE


class Deadline:
    """An overall deadline shared by all attempts of one call (None: no deadline)."""

    def __init__(self, timeout_s: float | None) -> None:
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self.at is None else max(self.at - time.monotonic(), 0.0)

    def allows_sleep(self, delay: float) -> bool:
        """True when sleeping `delay` still leaves time for another attempt."""
        return self.at is None or time.monotonic() + delay < self.at
