"""Start an epserve server in a subprocess for the load tool (`epserve-load` without --target).

The server binds port 0 (the OS picks a free port) and the bound address is read back from its
log, so there is no port race. Its output goes to a file that the report names.
"""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LISTENING = re.compile(r"epserve listening on (\S+):(\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnedServer:
    def __init__(self, overrides: list[str], log_path: str | None = None, http: bool = False) -> None:
        self.overrides = ["server.port=0", *overrides]
        self.http_port = _free_port() if http else 0  # the OpenAI-compatible front end has no port-0 mode
        if http:
            self.overrides.append(f"server.http_port={self.http_port}")
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="epserve-load-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.target = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 300.0) -> "SpawnedServer":
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "server", *self.overrides],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            match = LISTENING.search(self.log_path.read_text())
            if match:
                self.target = f"{match.group(1)}:{match.group(2)}"
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} before listening; "
                                   f"see {self.log_path}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the server was not listening after {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain) and wait; SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def __enter__(self) -> "SpawnedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
