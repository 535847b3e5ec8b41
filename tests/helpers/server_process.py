"""Run the real server (`python -m server ...`) in a subprocess on a free loopback port.

The server is started with server.port=0: the OS picks a free port and the server logs the
address it bound, which is read back from its log (no port races). Its output goes to a file
so a failing test can show the server's side of the story.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from clients import Client

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"epserve listening on (\S+):(\d+)")
START_TIMEOUT_S = float(os.environ.get("EPSERVE_TEST_START_TIMEOUT", "180"))


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (for the metrics endpoint, which has no port-0 mode)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(log_dir, "routing=fake_balance") as srv: Client(srv.target)...`"""

    def __init__(self, log_dir: Path, *overrides: str, env: dict[str, str] | None = None,
                 metrics: bool = False, wait_ready: bool = True, own_group: bool = False, http: bool = False) -> None:
        # EPSERVE_TEST_SERVER_OVERRIDES (space-separated) runs every server test on, e.g., another model.
        extra = os.environ.get("EPSERVE_TEST_SERVER_OVERRIDES", "").split()
        self.overrides = ["server.port=0", *extra, *overrides]
        self.metrics_port = free_port() if metrics else 0
        if metrics:
            self.overrides.append(f"server.metrics_port={self.metrics_port}")
        self.http_port = free_port() if http else 0  # the OpenAI-compatible front end (server.http_port)
        if http:
            self.overrides.append(f"server.http_port={self.http_port}")
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = Path(log_dir) / f"server-{time.monotonic_ns()}.log"
        self._wait_ready = wait_ready
        self._own_group = own_group  # a process group of its own, as a shell gives a job (os.killpg)
        self.proc: subprocess.Popen | None = None
        self.host, self.port = "127.0.0.1", 0

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_base_url(self) -> str:
        """The OpenAI base URL of the HTTP front end (http=True)."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    def start(self) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "server", *self.overrides], cwd=ROOT, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     process_group=0 if self._own_group else None)
        try:
            self.wait_listening()
            if self._wait_ready:
                self.wait_ready()
        except BaseException:
            self.proc.kill()
            self.proc.wait(10)
            self._log.close()
            raise
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_listening(self, timeout: float = START_TIMEOUT_S) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            match = LISTENING.search(self.log())
            if match:
                self.host, self.port = match.group(1).strip("[]"), int(match.group(2))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before listening:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"server not listening after {timeout}s:\n{self.log()}")

    def wait_ready(self, timeout: float = START_TIMEOUT_S, **client_kwargs) -> None:
        with Client(self.target, **client_kwargs) as client:
            try:
                client.wait_ready(timeout)
            except Exception as exc:
                raise RuntimeError(f"{exc}\nserver log:\n{self.log()}") from None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """`sig` to every process of the server's group (Ctrl-C in a shell, systemd's KillMode)."""
        assert self._own_group, "start with own_group=True"
        os.killpg(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"server did not exit within {timeout}s:\n{self.log()}") from None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; kill if it hangs (and fail loudly)."""
        if self.proc is None:
            return 0
        try:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self.signal(signal.SIGTERM)
            return self.wait_exit(timeout)
        except TimeoutError:
            self.proc.kill()
            self.proc.wait(10)
            raise
        finally:
            self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            if self.proc is not None and self._own_group:
                try:  # nothing of a failed test's server outlives it (ranks, engine core)
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
