"""Load, cancellation storm and a slow reader against one real server (embedded model, CPU).

CI-sized versions of what `epserve-load` runs in full (docs/RELIABILITY.md has the full-size
numbers): with engine.max_num_seqs=16 so that streams queue, 32 streams x 16 tokens, twice, with the memory check; a storm of 32 streams of which
half are cancelled at seeded random points; one stream that stops reading while 16 others run.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from clients import AsyncClient, Client, NO_RETRY
from clients.pb import generation_pb2 as g
from clients.pb.service_pb2_grpc import GenerationServiceStub
from server.loadtest import memory
from server.loadtest.cli import main as load_main
from server.loadtest.session import run_session, wait_idle
from server.loadtest.workload import LoadSpec, plan_streams, run_load
from tests.helpers.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # 16 running sequences at most: 32 streams queue as the full-size 256 do at the default 64.
    with ServerProcess(tmp_path_factory.mktemp("reliability-load"), "engine.max_num_seqs=16") as srv:
        yield srv


@pytest.fixture(scope="module")
def vocab_size(server) -> int:
    with Client(server.target) as c:
        return c.info().vocab_size


def reference_tokens(server) -> tuple[int, ...]:
    """A fixed greedy generation: the same before and after any load (no state leaks between sequences)."""
    with Client(server.target, timeout=60) as c:
        return c.generate([11, 12, 13, 14], max_new_tokens=12, ignore_eos=True).token_ids


GROWER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(48 * 2**20); time.sleep(60)"])
print("ready", flush=True)
sys.stdin.readline()
kept = bytearray(64 * 2**20)  # touched pages: RSS grows by 64 MiB
print("grown", flush=True)
sys.stdin.readline()
child.kill()
"""


def test_memory_check_sees_growth_and_worker_processes():
    """The instrument itself: RSS read from /proc sees a 64 MiB allocation (judged as growth
    beyond tolerance) and counts child processes (EP worker ranks) in the tree total."""
    proc = subprocess.Popen([sys.executable, "-c", GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    tree: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        end = time.monotonic() + 30
        while (before := memory.sample(proc.pid)).tree_rss_bytes - before.rss_bytes < 40 * memory.MIB:
            assert time.monotonic() < end, "the child's 48 MiB never showed up in the tree RSS"
            time.sleep(0.05)
        tree = memory.process_tree(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "grown"
        after = memory.sample(proc.pid)
        assert after.rss_bytes - before.rss_bytes >= 60 * memory.MIB
        verdict = memory.judge(before, after, tolerance_mib=8.0, tolerance_frac=0.01)
        assert not verdict.ok and verdict.growth_bytes >= 60 * memory.MIB
        assert memory.judge(after, after, 8.0, 0.01).ok
    finally:
        for pid in tree[1:]:  # the child first: it would outlive a killed parent
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(10)


def test_load_tool_ci_run(server, tmp_path, capsys):
    """`epserve-load --streams 32 --tokens 16` against the module's server: every stream gets
    exactly 16 tokens, the server is idle after each run, RSS after run 2 within tolerance of
    RSS after run 1, and the report has TTFT percentiles and tokens/s."""
    before = reference_tokens(server)
    out = tmp_path / "load.json"
    code = load_main(["--target", server.target, "--server-pid", str(server.proc.pid), "--streams", "32",
                      "--tokens", "16", "--runs", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    report = json.loads(out.read_text())
    assert report["ok"] and not report["failures"]
    for run in report["runs"]:
        assert (run["completed"], run["errors"], run["tokens"]) == (32, 0, 32 * 16)
        assert run["server_codes"] == {"OK": 32} and run["idle_after_s"] is not None
        assert 0 < run["ttft_p50_s"] <= run["ttft_p99_s"] <= run["latency_p99_s"] and run["tokens_per_s"] > 0
    assert report["memory"]["ok"] and report["memory"]["baseline_mib"] > 100  # a real RSS was read
    assert "TTFT p50" in text and "tokens/s" in text and "back to baseline" in text
    assert reference_tokens(server) == before


def test_cancellation_storm(server, vocab_size):
    """Half of 32 streams are cancelled at seeded random points (some before their first token,
    while still queued): every other stream completes with exactly 16 tokens, the server ends
    every call OK or CANCELLED, and running sequences, queue, KV blocks and calls return to zero."""
    before = reference_tokens(server)
    spec = LoadSpec(streams=32, new_tokens=16, cancel_fraction=0.5, seed=1)
    planned = [p for p in plan_streams(spec, vocab_size) if p.cancel_after is not None]
    assert len(planned) == 16 and any(p.cancel_after == 0 for p in planned)

    async def storm():
        async with AsyncClient(server.target, retry=NO_RETRY, timeout=60) as client:
            return await run_session(client, spec, runs=1, idle_timeout_s=10.0)

    report = asyncio.run(storm())
    assert report.ok, report.failures
    run = report.runs[0]
    by_index = {r.plan.index: r for r in run.result.streams}
    for plan in plan_streams(spec, vocab_size):
        r = by_index[plan.index]
        if plan.cancel_after is None:
            assert r.finish is not None and r.tokens == 16 and r.usage_tokens == 16, r
        else:  # cancelled, or (when its last tokens came merged in one message) finished first
            assert r.cancelled or r.tokens == 16, r
            assert r.error is None
    assert sum(r.cancelled for r in run.result.streams) >= 12
    assert run.idle_after_s is not None and set(run.codes) <= {"OK", "CANCELLED"} and run.codes.get("CANCELLED")
    with Client(server.target) as c:
        stats = c.server_info().stats
    assert (stats.running_sequences, stats.waiting_sequences, stats.kv_blocks_used, stats.active_calls) == (0, 0, 0, 0)
    assert reference_tokens(server) == before


async def _read_all(call) -> list[g.GenerateResponse]:
    out = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        out.append(msg)
    return out


def test_slow_reader_does_not_stall_other_streams(server, vocab_size):
    """One stream stops reading after its first message, on a channel whose HTTP/2 window is
    tiny (so the server's writes to it block at once). Meanwhile 16 other streams run to the end
    in about the time they take alone; the slow stream's sequence finishes generating anyway
    (its batch slot and KV blocks are freed while the reader sleeps, its tokens wait merged on
    the server), and once it reads again it gets all 64 tokens, in fewer messages than tokens."""
    spec = LoadSpec(streams=16, new_tokens=32, seed=99)
    slow_tokens = 64

    async def scenario():
        async with AsyncClient(server.target, retry=NO_RETRY, timeout=120) as client:
            baseline = await run_load(client, spec, vocab_size)
            options = [("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0)]
            async with grpc.aio.insecure_channel(server.target, options=options) as channel:
                call = GenerationServiceStub(channel).GenerateStream(
                    g.GenerateRequest(token_ids=g.TokenIds(ids=[7, 8, 9]), max_new_tokens=slow_tokens, ignore_eos=True),
                    timeout=120)
                first = await call.read()  # the slow stream is running; now it stops reading
                with_slow = await asyncio.wait_for(run_load(client, spec, vocab_size), 120)
                end = time.monotonic() + 30
                while (stats := (await client.server_info()).stats).running_sequences and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                rest = await _read_all(call)
            idle_s, _ = await wait_idle(client, 10.0)
            return baseline, first, with_slow, stats, rest, idle_s

    baseline, first, with_slow, paused_stats, rest, idle_s = asyncio.run(scenario())
    for run in (baseline, with_slow):
        assert not run.errors and len(run.completed) == 16 and run.tokens == 16 * 32
    # Other streams were not held up by the stalled one (generous bound: a shared 2-core machine).
    assert with_slow.wall_s < 3 * baseline.wall_s + 5, (baseline.wall_s, with_slow.wall_s)
    # While the reader slept: nothing running, no KV held; only its call is still open.
    assert (paused_stats.running_sequences, paused_stats.kv_blocks_used, paused_stats.active_calls) == (0, 0, 1)
    messages = [first, *rest]
    assert sum(len(m.token_ids) for m in messages) == slow_tokens
    assert messages[-1].finish_reason == g.FINISH_REASON_LENGTH and messages[-1].usage.completion_tokens == slow_tokens
    assert len(messages) < slow_tokens  # flow control held the writes; pending tokens were merged
    assert idle_s is not None


def test_load_tool_from_client_processes_beside_the_engine_alone(server, tmp_path, capsys):
    """`epserve-load --procs 2 --compare-in-process`: the streams come from two client processes
    (every one gets exactly its tokens), and the same prompts run on the engine alone in this
    process; the report gives both figures and their ratio."""
    out = tmp_path / "load.json"
    code = load_main(["--target", server.target, "--streams", "16", "--tokens", "8", "--runs", "1", "--procs", "2",
                      "--compare-in-process", "--server-arg", "engine.max_num_seqs=16", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert (run["completed"], run["errors"], run["tokens"]) == (16, 0, 16 * 8) and run["server_codes"] == {"OK": 16}
    engine = report["in_process"][0]
    assert engine["tokens"] == 16 * 8 and engine["tokens_per_s"] > 0 and engine["ttft_p50_s"] > 0
    assert report["served_over_in_process"] > 0 and "served / in-process" in text
