"""A load session: identical runs back to back, each followed by the checks that the server
is idle again, accounted for every call, and (with its pid) back to its memory baseline.

Checks, each a line in `LoadReport.failures` when broken:
* every stream that was not cancelled on purpose ends with exactly M tokens, finish LENGTH, and
  no stream gets an error;
* within `idle_timeout_s` of a run the server runs and queues nothing, holds no KV blocks and
  has no calls in flight (GetServerInfo stats);
* the server's per-status call counters moved only by OK and CANCELLED, OK covers every stream
  that completed, and OK + CANCELLED is at most the number of streams;
* RSS of the server and its workers after the last run is within tolerance of the RSS after
  the first (warm-up) run (see memory.py for why the first run is the baseline).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from clients import AsyncClient, ServerStats

from . import memory
from .procs import run_load_procs
from .workload import LoadSpec, RunResult, run_load


@dataclass(frozen=True)
class RunReport:
    result: RunResult
    idle_after_s: float | None  # seconds until the server was idle again; None: it was not
    codes: dict[str, int]  # change of the server's requests_by_code over the run
    memory: memory.MemorySample | None
    before: memory.MemorySample | None = None  # sampled just before the run (CPU time deltas)


@dataclass
class LoadReport:
    spec: LoadSpec
    runs: list[RunReport] = field(default_factory=list)
    ready_memory: memory.MemorySample | None = None
    memory_verdict: memory.MemoryVerdict | None = None
    failures: list[str] = field(default_factory=list)
    in_process: list | None = None  # InProcessResult per run (--compare-in-process)

    @property
    def ok(self) -> bool:
        return not self.failures


async def wait_idle(client: AsyncClient, timeout: float) -> tuple[float | None, ServerStats]:
    """Poll GetServerInfo until nothing runs, waits, holds KV or is in flight."""
    start = time.monotonic()
    while True:
        stats = (await client.server_info()).stats
        if (stats.running_sequences, stats.waiting_sequences, stats.kv_blocks_used, stats.active_calls) == (0, 0, 0, 0):
            return time.monotonic() - start, stats
        if time.monotonic() - start > timeout:
            return None, stats
        await asyncio.sleep(0.05)


def _check_run(n: int, run: RunReport) -> list[str]:
    res, out = run.result, []
    for r in res.errors[:5]:
        out.append(f"run {n}: stream {r.plan.index}: {r.error}")
    if len(res.errors) > 5:
        out.append(f"run {n}: ... {len(res.errors) - 5} more streams failed")
    completed, cancelled = len(res.completed), sum(r.cancelled for r in res.streams)
    if completed + cancelled + len(res.errors) != len(res.streams):
        out.append(f"run {n}: {len(res.streams)} streams but {completed} completed, {cancelled} cancelled, "
                   f"{len(res.errors)} failed")
    if run.idle_after_s is None:
        out.append(f"run {n}: the server was not idle again (running/waiting/KV/calls not all zero)")
    extra = {c: v for c, v in run.codes.items() if c not in ("OK", "CANCELLED") and v}
    ok, cut = run.codes.get("OK", 0), run.codes.get("CANCELLED", 0)
    if extra:
        out.append(f"run {n}: the server ended calls with {extra}")
    if not completed <= ok <= completed + cancelled or ok + cut > len(res.streams):
        out.append(f"run {n}: server counted OK={ok} CANCELLED={cut} for {completed} completed and "
                   f"{cancelled} cancelled streams")
    return out


async def run_session(client: AsyncClient, spec: LoadSpec, runs: int = 2, server_pid: int | None = None,
                      idle_timeout_s: float = 30.0, tolerance_mib: float = 8.0,
                      tolerance_frac: float = 0.01, procs: int = 1, target: str | None = None,
                      client_options: dict | None = None) -> LoadReport:
    """`runs` identical runs; with `server_pid`, memory is judged after the last against the first.
    With `procs` > 1 the streams come from that many client processes (connecting to `target`
    with `client_options`); `client` then only checks the server between runs."""
    await client.wait_ready(120.0)
    vocab_size = (await client.info()).vocab_size
    report = LoadReport(spec)
    if server_pid is not None:
        report.ready_memory = memory.sample(server_pid)
    for n in range(1, runs + 1):
        before = (await client.server_info()).stats.requests_by_code
        mem_before = memory.sample(server_pid) if server_pid is not None else None
        if procs > 1:
            result = await asyncio.to_thread(run_load_procs, target, client_options or {}, spec, vocab_size, procs)
        else:
            result = await run_load(client, spec, vocab_size)
        idle_s, stats = await wait_idle(client, idle_timeout_s)
        codes = {c: v - before.get(c, 0) for c, v in stats.requests_by_code.items() if v != before.get(c, 0)}
        mem = memory.sample(server_pid) if server_pid is not None else None
        run = RunReport(result, idle_s, codes, mem, mem_before)
        report.runs.append(run)
        report.failures.extend(_check_run(n, run))
    if server_pid is not None and runs >= 2:
        verdict = memory.judge(report.runs[0].memory, report.runs[-1].memory, tolerance_mib, tolerance_frac)
        report.memory_verdict = verdict
        if not verdict.ok:
            report.failures.append(
                f"memory: RSS grew {verdict.growth_bytes / memory.MIB:.1f} MiB from the end of run 1 to the end of "
                f"run {runs} (tolerance {verdict.tolerance_bytes / memory.MIB:.1f} MiB)")
    return report
