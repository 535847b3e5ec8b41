"""What an operator pays for an idle server, and how fast it goes away.

* An idle EP server (ep2 over gloo on CPU) blocks instead of polling: the whole process tree
  (front end, engine core, rank 1) uses under 5% of one core once it reports SERVING.
* SIGTERM with nothing in flight: the server logs "stopped" within 3 s of its SIGTERM line (its
  own clock, so a loaded CI machine's interpreter teardown does not count) and the process is
  gone well before the 10 s grace period it did not need.
* SIGTERM with a stream in flight: it drains, cuts the stream at the grace period, and exits
  within the grace period plus 3 s, with "stopped" the last line it logs.
* Every server.log_interval_s while busy (and never while idle) one line: tok/s, running and
  waiting sequences, KV use, balancedness.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import pytest

from clients import Client, NO_RETRY, errors
from tests.helpers.server_process import ServerProcess

IDLE_CORES = 0.05
EXIT_S = 3.0
GRACE_S = 10.0  # server.grace_period_s's default


def _logged_seconds(log: str, marker: str) -> float:
    """Seconds since midnight of the last log line containing `marker` (the server's clock)."""
    lines = [line for line in log.splitlines() if marker in line]
    assert lines, f"no {marker!r} line in the log\n{log}"
    stamp = re.search(r"(\d\d):(\d\d):(\d\d),(\d{3})", lines[-1])
    assert stamp, lines[-1]
    h, m, s, ms = map(int, stamp.groups())
    return h * 3600 + m * 60 + s + ms / 1000


def _process_tree(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [p for child in children for p in _process_tree(int(child))]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` so far (their threads included)."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")
def test_idle_ep_server_blocks_and_exits_fast(tmp_path):
    with ServerProcess(tmp_path, "parallel=ep2", "server.log_interval_s=0.5") as srv:
        pids = _process_tree(srv.proc.pid)
        assert len(pids) >= 3, pids  # front end, engine core, rank 1
        time.sleep(1.0)  # the warm-up generation's last frames
        before, start, idle_from = _cpu_seconds(pids), time.monotonic(), len(srv.log())
        time.sleep(4.0)
        cores = (_cpu_seconds(pids) - before) / (time.monotonic() - start)
        assert cores < IDLE_CORES, f"an idle ep2 server uses {cores:.3f} of a core"
        assert "busy:" not in srv.log()[idle_from:], srv.log()[idle_from:]  # 8 intervals, all idle: no line
        started = time.monotonic()
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(30) == 0
        took = time.monotonic() - started
        assert took < GRACE_S, f"idle ep2 server took {took:.1f} s to exit: it waited for its grace period\n{srv.log()}"
        stopping = _logged_seconds(srv.log(), "SIGTERM: draining")
        stopped = _logged_seconds(srv.log(), "epserve stopped")
        assert stopped - stopping < EXIT_S, f"idle ep2 server logged stopped {stopped - stopping:.1f} s after SIGTERM\n{srv.log()}"


def test_draining_server_exits_within_the_grace_period_and_logs_stopped_last(tmp_path):
    grace = 2.0
    with ServerProcess(tmp_path, "parallel=ep2", f"server.grace_period_s={grace}", "server.log_interval_s=0.5") as srv:
        with Client(srv.target, retry=NO_RETRY) as client:
            outcome: list[BaseException | None] = []

            def read_long_stream() -> None:
                try:
                    with client.stream([1, 2, 3], max_new_tokens=client.info().max_model_len - 8, ignore_eos=True) as s:
                        for _ in s:
                            pass
                    outcome.append(None)
                except BaseException as exc:  # noqa: BLE001 - the cut is what this test waits for
                    outcome.append(exc)

            reader = threading.Thread(target=read_long_stream)
            reader.start()
            deadline = time.monotonic() + 30
            while "busy:" not in srv.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            started = time.monotonic()
            srv.signal(signal.SIGTERM)
            assert srv.wait_exit(60) == 0
            took = time.monotonic() - started
            reader.join(10)
        assert outcome and isinstance(outcome[0], errors.UnavailableError), outcome
        assert took < grace + EXIT_S, f"draining ep2 server took {took:.1f} s to exit (grace {grace} s)\n{srv.log()}"
        assert "epserve stopped" in srv.log().strip().splitlines()[-1], srv.log()[-2000:]
        busy = next(line for line in srv.log().splitlines() if "busy:" in line)
        assert re.search(r"busy: [\d.]+ tok/s generated, 1 running, 0 waiting, KV cache [1-9]\d*/8192 blocks \([\d.]+%\), "
                         r"balancedness \(mean/max\) expert 0\.\d+ rank (0\.\d+|1\.000) over 2 rank\(s\)", busy), busy


def test_balancedness_is_mean_over_max_averaged_over_layers():
    from server.rpc.busy_log import balancedness

    assert balancedness([[2, 2], [1, 3]]) == (1.0 + 2 / 3) / 2
    assert balancedness([[0, 0]]) is None
