"""Start-up, drain and shutdown of the real server process.

* health is NOT_SERVING while the model loads; a retrying client gets through once it is up;
* SIGTERM: health NOT_SERVING, new calls UNAVAILABLE, the call in flight finishes, exit 0;
* a call longer than server.grace_period_s is cut with UNAVAILABLE, still exit 0;
* a port already in use, or a bad setting, ends start-up with one paragraph and exit code 2,
  no traceback; the front end's own settings are refused before the port opens.
"""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from clients import Client, FinishReason, NO_RETRY, RetryPolicy, errors
from tests.helpers.server_process import ROOT, ServerProcess

PATIENT = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.2)


def tokens_lasting(client: Client, seconds: float, cap: int) -> int:
    """How many new tokens one sequence takes `seconds` to generate on this machine (<= cap)."""
    start = time.perf_counter()
    client.generate([1, 2, 3], max_new_tokens=32, ignore_eos=True)
    per_token = (time.perf_counter() - start) / 32
    return max(8, min(cap, int(seconds / per_token)))


def wait_health(client: Client, want: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while (got := client.health()) != want:
        if time.monotonic() > end:
            raise AssertionError(f"health {got}, expected {want}")
        time.sleep(0.02)


def test_loading_then_serving_then_drain_on_sigterm(tmp_path):
    srv = ServerProcess(tmp_path, "server.grace_period_s=60", wait_ready=False).start()
    try:
        with Client(srv.target, retry=PATIENT, timeout=120) as client:
            assert client.health() == "NOT_SERVING"  # the port opens before the model loads
            assert client.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
            assert client.health() == "SERVING"
            model = client.info()
            n = tokens_lasting(client, 3.0, model.max_model_len - 8)
            with client.stream([1, 2, 3], max_new_tokens=n, ignore_eos=True) as stream:
                first = next(stream)
                srv.signal(signal.SIGTERM)
                wait_health(client, "NOT_SERVING")
                with Client(srv.target, retry=NO_RETRY) as impatient:
                    with pytest.raises(errors.UnavailableError, match="shutting down"):
                        impatient.generate([1, 2], max_new_tokens=2)
                    assert impatient.server_info().state.value == "draining"
                rest = list(stream)
            assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == n
            assert stream.completion.finish_reason is FinishReason.LENGTH
        assert srv.wait_exit(60) == 0
        assert "LOADING -> SERVING" in srv.log() and "SERVING -> DRAINING" in srv.log()
    finally:
        srv.stop()


def test_grace_period_cuts_long_calls_and_port_in_use(tmp_path):
    with ServerProcess(tmp_path, "server.grace_period_s=1") as srv:
        # A second server on the same port: one paragraph, exit code 2, no traceback.
        clash = subprocess.run([sys.executable, "-m", "server", f"server.port={srv.port}"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        assert clash.returncode == 2, clash.stderr
        assert "server.port" in clash.stderr and "Traceback" not in clash.stderr

        with Client(srv.target, retry=NO_RETRY) as client:
            model = client.info()
            n = tokens_lasting(client, 30.0, model.max_model_len - 8)
            with client.stream([1, 2, 3], max_new_tokens=n, ignore_eos=True) as stream:
                next(stream)
                started = time.monotonic()
                srv.signal(signal.SIGTERM)
                with pytest.raises(errors.UnavailableError, match="grace period"):
                    for _ in stream:
                        pass
                assert time.monotonic() - started < 15
        assert srv.wait_exit(60) == 0


@pytest.mark.parametrize("overrides, needle", [
    (["routing.name=no_such_policy"], "no_such_policy"),
    (["parallel.ep_size=3"], "parallel.ep_size"),
    (["model.path=/nonexistent/checkpoint"], "/nonexistent/checkpoint"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_config_is_one_paragraph_and_exit_2(overrides, needle):
    run = subprocess.run([sys.executable, "-m", "server", "server.port=0", *overrides], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert needle in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("server_cfg, needle", [
    (dict(tls_cert="/nonexistent/cert.pem", tls_key="/nonexistent/key.pem"), "server.tls_key"),
    (dict(auth_token_env="EPSERVE_TEST_UNSET_VARIABLE"), "EPSERVE_TEST_UNSET_VARIABLE"),
    (dict(metrics_port=9400, metrics_host="0.0.0.0"), "server.metrics_host"),
], ids=["unreadable TLS files", "unset token variable", "remote metrics without allow_remote"])
def test_front_end_settings_are_checked_before_anything_starts(server_cfg, needle, monkeypatch):
    from server.config import AppConfig, ConfigError
    from server.frontend.start import start_engine
    from server.rpc.app import serve

    monkeypatch.delenv("EPSERVE_TEST_UNSET_VARIABLE", raising=False)
    app = AppConfig.from_dict({"server": {"port": 0, **server_cfg}})
    with pytest.raises(ConfigError, match=needle):
        asyncio.run(serve(app, start_engine))
