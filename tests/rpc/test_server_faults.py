"""A worker rank killed (parallel=ep2 over gloo), mid-generation or while idle, a worker rank
stopped (SIGSTOP: alive but hung), or the engine-core process killed under load: the calls in
flight fail with UNAVAILABLE within seconds, health watchers see NOT_SERVING, and the process
exits non-zero so that a supervisor restarts it."""
from __future__ import annotations

import os
import queue
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import Client, NO_RETRY, errors
from tests.helpers.server_process import ServerProcess


def spawned_tree(pid: int) -> dict[int, int]:
    """pid -> parent pid of the processes below `pid` started by multiprocessing spawn (the
    engine-core process, and the EP worker ranks it spawns)."""
    parents, spawned = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if "multiprocessing.spawn" in cmdline:
            spawned.add(int(entry.name))
    below, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child in spawned:
                below[child] = parent
                todo.append(child)
    return below


def spawned_children(pid: int) -> list[int]:
    """The EP worker ranks below the server: spawned processes that spawned none themselves
    (the engine-core process, when there is one, is their parent)."""
    tree = spawned_tree(pid)
    return [p for p in tree if p not in tree.values()]


def engine_core_process(pid: int) -> int:
    """The engine-core process: the server's spawned child."""
    core = [p for p, parent in spawned_tree(pid).items() if parent == pid]
    assert len(core) == 1, core
    return core[0]


def watch_health(target: str, seen: "queue.Queue[str]") -> None:
    with grpc.insecure_channel(target) as channel:
        try:
            for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="")):
                seen.put(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError:
            seen.put("ENDED")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker rank through /proc")
@pytest.mark.parametrize("in_flight", [True, False], ids=["mid-generation", "idle"])
def test_killed_rank_fails_calls_fast_and_exits_non_zero(tmp_path, in_flight):
    with ServerProcess(tmp_path, "parallel=ep2") as srv:
        workers = spawned_children(srv.proc.pid)
        assert len(workers) == 1, workers
        seen: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=watch_health, args=(srv.target, seen), daemon=True).start()
        assert seen.get(timeout=10) == "SERVING"
        if in_flight:
            with Client(srv.target, retry=NO_RETRY, timeout=60) as client:
                n = client.info().max_model_len - 8
                with client.stream([1, 2, 3], max_new_tokens=n, ignore_eos=True) as stream:
                    next(stream)
                    killed_at = time.monotonic()
                    os.kill(workers[0], signal.SIGKILL)
                    with pytest.raises(errors.UnavailableError, match="rank 1"):
                        for _ in stream:
                            pass
                    assert time.monotonic() - killed_at < 10
        else:
            os.kill(workers[0], signal.SIGKILL)  # nobody is calling: the engine's watcher notices
        assert seen.get(timeout=10) == "NOT_SERVING"
        assert srv.wait_exit(30) != 0
        assert "SERVING -> FAILED" in srv.log()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the engine core through /proc")
def test_killed_engine_process_ends_every_stream_with_unavailable(tmp_path):
    """SIGKILL the engine-core process while 24 streams are open (some running, some queued):
    every one ends with UNAVAILABLE within 10 s, none hangs, and the server exits non-zero."""
    import asyncio

    from clients import AsyncClient

    with ServerProcess(tmp_path, "engine.max_num_seqs=8") as srv:
        core = engine_core_process(srv.proc.pid)

        async def scenario():
            async with AsyncClient(srv.target, retry=NO_RETRY, timeout=120) as client:
                started = asyncio.Event()

                async def one() -> str:
                    try:
                        async for _ in client.stream([1, 2, 3], max_new_tokens=1500, ignore_eos=True):
                            started.set()
                    except errors.EpserveError as exc:
                        return type(exc).__name__
                    return "finished"

                tasks = [asyncio.create_task(one()) for _ in range(24)]
                await started.wait()
                killed_at = time.monotonic()
                os.kill(core, signal.SIGKILL)
                outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 10)
                return outcomes, time.monotonic() - killed_at

        outcomes, took = asyncio.run(scenario())
        assert outcomes == ["UnavailableError"] * 24 and took < 10, (outcomes, took)
        assert srv.wait_exit(30) != 0
        assert "SERVING -> FAILED" in srv.log() and "engine-core process exited" in srv.log()


STEP_TIMEOUT_S = 3.0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker rank through /proc")
def test_hung_rank_fails_every_stream_within_the_step_timeout(tmp_path):
    """SIGSTOP on EP rank 1 while 16 streams run: it never exits, so only the step watchdog can
    see it. Every stream ends with UNAVAILABLE within engine.step_timeout_s + a few s, health
    turns NOT_SERVING, the server exits non-zero, and the stopped rank is gone (killed)."""
    import asyncio

    with ServerProcess(tmp_path, "parallel=ep2", f"engine.step_timeout_s={STEP_TIMEOUT_S}",
                       "engine.first_step_timeout_s=20") as srv:
        workers = spawned_children(srv.proc.pid)
        assert len(workers) == 1, workers
        seen: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=watch_health, args=(srv.target, seen), daemon=True).start()
        assert seen.get(timeout=10) == "SERVING"
        try:
            outcomes, took = asyncio.run(_stop_while_decoding(srv.target, workers[0]))
            assert all(o.startswith("UnavailableError") and "hung" in o for o in outcomes), outcomes
            assert took < STEP_TIMEOUT_S + 4, took
            assert seen.get(timeout=10) == "NOT_SERVING"
            assert srv.wait_exit(30) != 0
            assert "SERVING -> FAILED" in srv.log() and "EP rank is hung" in srv.log()
            assert not Path(f"/proc/{workers[0]}").exists() or "zombie" in Path(f"/proc/{workers[0]}/status").read_text()
        finally:
            try:
                os.kill(workers[0], signal.SIGKILL)
            except ProcessLookupError:
                pass


async def _stop_while_decoding(target: str, pid: int, on_stop=None, join_s: float = 0.0) -> tuple[list[str], float]:
    """16 streams decode; once each has 3 chunks (the watchdog past its first steps), SIGSTOP
    `pid` -> (each stream's outcome, seconds from the stop until every stream ended).
    `on_stop(stopped_at)` runs right after the signal and may return a thread, joined after."""
    import asyncio

    from clients import AsyncClient

    async with AsyncClient(target, retry=NO_RETRY, timeout=120) as client:
        chunks = [0] * 16

        async def one(i: int) -> str:
            try:
                async for _ in client.stream([1, 2, 3 + i], max_new_tokens=1500, ignore_eos=True):
                    chunks[i] += 1
            except errors.EpserveError as exc:
                return f"{type(exc).__name__}: {exc}"
            return "finished"

        tasks = [asyncio.create_task(one(i)) for i in range(16)]
        while min(chunks) < 3:
            await asyncio.sleep(0.05)
        stopped_at = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        watcher = on_stop(stopped_at) if on_stop is not None else None
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        took = time.monotonic() - stopped_at
        if watcher is not None:
            await asyncio.to_thread(watcher.join, join_s)
        return outcomes, took


def _process_state(pid: int) -> str:
    """'T' stopped, 'Z' zombie, 'gone', ... (the State letter of /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "gone"
    return next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the engine core through /proc")
def test_stopped_engine_core_ends_every_stream_within_the_step_timeout(tmp_path):
    """SIGSTOP on the engine-core process (EP rank 0) while 16 streams decode: its own step
    watchdog is stopped with it, so the front end must see the silence. Every stream ends with
    UNAVAILABLE and health turns NOT_SERVING within engine.step_timeout_s + 2 s, with the core
    never resumed; the server exits non-zero and nothing of the engine is left (before: no
    stream ended and health stayed SERVING until the process was continued)."""
    import asyncio

    with ServerProcess(tmp_path, "parallel=ep2", f"engine.step_timeout_s={STEP_TIMEOUT_S}",
                       "engine.first_step_timeout_s=20") as srv:
        core = engine_core_process(srv.proc.pid)
        workers = spawned_children(srv.proc.pid)
        assert len(workers) == 1 and workers[0] != core, workers
        seen: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=watch_health, args=(srv.target, seen), daemon=True).start()
        assert seen.get(timeout=10) == "SERVING"
        health: dict[str, float] = {}

        states: list[tuple[float, str]] = []  # (s after the stop, the core's state) until NOT_SERVING

        def note_not_serving(stopped_at: float) -> None:
            while True:
                states.append((time.monotonic() - stopped_at, _process_state(core)))
                try:
                    status = seen.get(timeout=0.05)
                except queue.Empty:
                    if states[-1][0] > STEP_TIMEOUT_S + 10:
                        return
                    continue
                if status == "NOT_SERVING":
                    health["after_s"] = time.monotonic() - stopped_at
                    return

        try:
            def start_watcher(stopped_at: float) -> threading.Thread:
                watcher = threading.Thread(target=note_not_serving, args=(stopped_at,), daemon=True)
                watcher.start()
                return watcher

            outcomes, took = asyncio.run(_stop_while_decoding(srv.target, core, start_watcher, STEP_TIMEOUT_S + 10))
            assert all(o.startswith("UnavailableError") and "stopped or frozen" in o for o in outcomes), outcomes
            assert took < STEP_TIMEOUT_S + 2, took
            assert health.get("after_s", 99) < STEP_TIMEOUT_S + 2, health
            # stopped all along until the front end killed it (a killed process passes through R on its way
            # out, and SIGSTOP takes a moment to land: the samples count from the first stopped one)
            stopped = next((i for i, (_, state) in enumerate(states) if state in ("T", "t")), None)
            assert stopped is not None and states[stopped][0] < 1.0, states
            before_kill = [state for at, state in states[stopped:] if at < health["after_s"] - 0.5]
            assert before_kill and set(before_kill) <= {"T", "t"}, states
            assert srv.wait_exit(30) != 0
            assert "SERVING -> FAILED" in srv.log() and "stopped or frozen" in srv.log()
            end = time.monotonic() + 15  # the front end killed the core; rank 1 follows its parent
            while time.monotonic() < end and any(_process_state(p) not in ("Z", "gone") for p in (core, *workers)):
                time.sleep(0.1)
            assert all(_process_state(p) in ("Z", "gone") for p in (core, *workers))
        finally:
            for pid in (core, *workers):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
