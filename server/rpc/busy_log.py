"""One INFO line every server.log_interval_s while the engine has work, so an operator tailing
the log sees what the server is doing without a metrics stack: generated tokens per second,
running and waiting sequences, KV-cache use, and expert and rank balancedness (mean/max load,
over the interval's new expert-load counts, averaged over MoE layers). Idle intervals log
nothing. The load counters are read without a reset, so GetExpertLoad callers see the same
counts; a reset by one of them in between makes this interval's balance the counts since it.
"""
from __future__ import annotations

import asyncio
import logging

from ..engine.api import Engine

log = logging.getLogger("epserve.server")
TOKENS = "epserve_generation_tokens_total"


def balancedness(rows: list[list[int]]) -> float | None:
    """mean/max of each layer's row, averaged over layers with any load (None: no load)."""
    ratios = [sum(row) / len(row) / max(row) for row in rows if row and max(row) > 0]
    return sum(ratios) / len(ratios) if ratios else None


def _delta(now: list[list[int]], before: list[list[int]] | None) -> list[list[int]]:
    if before is None or len(before) != len(now):
        return now
    diff = [[a - b for a, b in zip(r, q)] for r, q in zip(now, before)]
    return now if any(v < 0 for row in diff for v in row) else diff  # counters reset in between


class BusyLog:
    def __init__(self, engine: Engine, metrics, interval_s: float) -> None:
        self.engine, self.metrics, self.interval_s = engine, metrics, interval_s
        self._tokens = self._generated()
        self._experts: list[list[int]] | None = None
        self._ranks: list[list[int]] | None = None

    def _generated(self) -> float:
        return self.metrics.registry.get_sample_value(TOKENS) or 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.interval_s)
            now = loop.time()
            line = await self.line(now - last)
            last = now
            if line:
                log.info("%s", line)

    async def line(self, elapsed_s: float) -> str | None:
        """The interval's line, or None when the engine was idle all of it."""
        stats = self.engine.stats()
        tokens = self._generated()
        made, self._tokens = tokens - self._tokens, tokens
        if not (stats.running or stats.waiting or made):
            return None
        snapshot = await self.engine.expert_load(reset=False)
        experts, ranks = snapshot.expert_tokens, snapshot.rank_tokens()
        expert_bal, rank_bal = balancedness(_delta(experts, self._experts)), balancedness(_delta(ranks, self._ranks))
        self._experts, self._ranks = experts, ranks
        used = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        return (f"busy: {made / elapsed_s:.1f} tok/s generated, {stats.running} running, {stats.waiting} waiting, "
                f"KV cache {stats.kv_blocks_used}/{stats.kv_blocks_total} blocks ({used:.1%}), balancedness (mean/max) expert "
                f"{fmt(expert_bal)} rank {fmt(rank_bal)} over {snapshot.ep_size} rank(s), last {elapsed_s:.0f} s")
