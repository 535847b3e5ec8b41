"""A worker rank killed (parallel=ep2 over gloo), mid-generation or while idle: the call in
flight fails with UNAVAILABLE within 10 s, health watchers see NOT_SERVING, and the process
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


def spawned_children(pid: int) -> list[int]:
    """Child processes of `pid` started by multiprocessing spawn (the EP worker ranks)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and "multiprocessing.spawn" in cmdline:
            out.append(int(entry.name))
    return out


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
