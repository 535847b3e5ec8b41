"""One load run driven from N client processes, so that the load tool is not the bottleneck.

The seeded stream plans are dealt round-robin to N spawned processes; each opens its own
channel, creates its streams, and waits at a shared barrier, so every stream of every process
is released at the same moment. Each process returns its StreamResults and when its last
stream ended (CLOCK_MONOTONIC is shared by all processes of the machine); the wall time is
release -> last end over all processes.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import time
from typing import Any

from .workload import LoadSpec, RunResult, StreamPlan, StreamResult, plan_streams, run_stream


def _client_process(target: str, client_options: dict[str, Any], spec: LoadSpec, plans: list[StreamPlan],
                    barrier, results) -> None:
    from clients import AsyncClient, RetryPolicy

    async def main() -> tuple[list[StreamResult], float, float]:
        retry = RetryPolicy(max_attempts=1)
        async with AsyncClient(target, retry=retry, timeout=60.0, **client_options) as client:
            await client.wait_ready(120.0)
            start = asyncio.Event()
            tasks = [asyncio.create_task(run_stream(client, p, spec, start)) for p in plans]
            await asyncio.sleep(0)
            await asyncio.to_thread(barrier.wait)
            released = time.monotonic()
            start.set()
            done = await asyncio.gather(*tasks)
            return list(done), released, time.monotonic()

    results.put(asyncio.run(main()))


def run_load_procs(target: str, client_options: dict[str, Any], spec: LoadSpec, vocab_size: int,
                   procs: int) -> RunResult:
    """`spec` from `procs` client processes at once (blocking; run it in a thread from asyncio)."""
    return run_plans_procs(target, client_options, spec, plan_streams(spec, vocab_size), procs)


def run_plans_procs(target: str, client_options: dict[str, Any], spec: LoadSpec, plans: list[StreamPlan],
                    procs: int) -> RunResult:
    """These stream plans (e.g. the benchmark's prompts of varying length) from `procs` client
    processes at once; `spec` gives the new tokens per stream and the read options."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_client_process, name=f"epserve-load-{i}", daemon=True,
                           args=(target, client_options, spec, plans[i::procs], barrier, results))
               for i in range(procs)]
    for w in workers:
        w.start()
    parts = []
    try:
        for _ in workers:
            while True:
                try:
                    parts.append(results.get(timeout=1.0))
                    break
                except Exception:  # queue.Empty: check that nobody died
                    dead = [w for w in workers if w.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"load client process {dead[0].name} exited with code {dead[0].exitcode}")
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
    streams = sorted((r for part, _, _ in parts for r in part), key=lambda r: r.plan.index)
    released = min(p[1] for p in parts)
    return RunResult(spec, tuple(streams), max(p[2] for p in parts) - released)
