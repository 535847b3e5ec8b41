"""server.http_port / server.http_host at start-up: bad values and a busy port are config
errors (exit 2, one paragraph naming the key), checked before the engine loads."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.helpers.server_process import ROOT


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def run_server(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "server.port=0", *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("overrides, needle", [
    (["server.http_port=70000"], "server.http_port"),
    (["server.http_port=8123", "server.http_host=0.0.0.0"], "server.http_host"),
], ids=["port out of range", "remote host without allow_remote"])
def test_bad_http_settings_exit_2(overrides, needle):
    run = run_server(*overrides)
    assert run.returncode == 2 and needle in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_http_port_in_use_exits_2_before_loading(busy_port):
    run = run_server(f"server.http_port={busy_port}")
    assert run.returncode == 2, run.stderr
    assert f"server.http_port: cannot listen on 127.0.0.1:{busy_port}" in run.stderr
    assert "Traceback" not in run.stderr and "warm-up" not in run.stderr


def test_sigterm_drains_http_calls_and_cuts_them_after_the_grace_period(tmp_path):
    import signal
    import time

    import openai

    from tests.helpers.server_process import ServerProcess

    with ServerProcess(tmp_path, "server.grace_period_s=1", http=True) as srv:
        oa = openai.OpenAI(base_url=srv.http_base_url, api_key="x", max_retries=0)
        stream = oa.completions.create(model="tiny", prompt="import os", max_tokens=1500, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        started = time.monotonic()
        srv.signal(signal.SIGTERM)
        time.sleep(0.2)  # the signal lands
        with pytest.raises(openai.APIStatusError) as refused:  # draining: new calls are turned away
            oa.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert refused.value.status_code == 503
        finishes = [c.choices[0].finish_reason for c in stream if c.choices]
        assert finishes[-1] == "abort" and time.monotonic() - started < 15
        assert srv.wait_exit(60) == 0


def test_http_port_with_time_wait_connections_binds_again():
    """A restart right after a run that closed its connections first: the port holds TIME_WAIT
    entries, not a listener, and the HTTP front end must bind it (as the metrics port does)."""
    from server.config import AppConfig
    from server.http.front_end import HttpFrontEnd

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
        client.close()
    front_end = HttpFrontEnd(AppConfig.from_dict({"server": {"http_port": port}}))
    front_end._bind().close()
