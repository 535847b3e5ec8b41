"""TLS and bearer-token auth end to end, and the front end's concurrent-call limit.

One server with TLS (a self-signed certificate made here with the openssl CLI), a token read
from an environment variable, and server.max_concurrent_streams=2.
"""
from __future__ import annotations

import shutil
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import Client, NO_RETRY, errors
from tests.helpers.server_process import ServerProcess

TOKEN = "s3cret-token-for-tests"


def self_signed_cert(directory) -> tuple[str, str]:
    """(cert.pem, key.pem) for CN=localhost with subjectAltNames localhost and 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make a test certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    cert, key = self_signed_cert(tmp)
    srv = ServerProcess(tmp, f"server.tls_cert={cert}", f"server.tls_key={key}",
                        "server.auth_token_env=EPSERVE_TEST_TOKEN", "server.max_concurrent_streams=2",
                        env={"EPSERVE_TEST_TOKEN": TOKEN}, wait_ready=False).start()
    srv.cert = cert
    try:
        srv.wait_ready(root_certificates=cert, server_hostname="localhost")
        yield srv
    finally:
        srv.stop()


def client(srv, **kw) -> Client:
    return Client(srv.target, root_certificates=srv.cert, retry=NO_RETRY, timeout=30, **kw)


def test_right_token_over_tls_works(secure_server):
    with client(secure_server, token=TOKEN) as c:
        out = c.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True)
        assert out.usage.completion_tokens == 3
        info = c.server_info()
        assert info.config["tls"] and info.config["auth"]


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_unauthenticated(secure_server, token, monkeypatch):
    monkeypatch.delenv("EPSERVE_TOKEN", raising=False)
    with client(secure_server, token=token) as c:
        with pytest.raises(errors.AuthenticationError):
            c.generate([1, 2, 3], max_new_tokens=2)
        with pytest.raises(errors.AuthenticationError):
            c.info()
        with pytest.raises(errors.AuthenticationError):
            with c.stream([1, 2, 3], max_new_tokens=2) as s:
                list(s)


def test_health_needs_no_token(secure_server):
    with client(secure_server) as c:
        assert c.health() == "SERVING"


def test_plaintext_client_cannot_talk_to_a_tls_server(secure_server):
    with Client(secure_server.target, token=TOKEN, retry=NO_RETRY, timeout=10) as c:
        with pytest.raises(errors.UnavailableError):
            c.info()


def test_untrusted_certificate_is_refused(secure_server, tmp_path):
    other_cert, _ = self_signed_cert(tmp_path)
    with Client(secure_server.target, token=TOKEN, root_certificates=other_cert, retry=NO_RETRY, timeout=10) as c:
        with pytest.raises(errors.UnavailableError):
            c.info()


def test_concurrent_call_limit_gives_resource_exhausted(secure_server):
    """server.max_concurrent_streams=2: a third concurrent generation call is refused at once."""
    with client(secure_server, token=TOKEN) as c:
        n = c.info().max_model_len - 8
        with c.stream([1, 2, 3], max_new_tokens=n, ignore_eos=True) as a, \
                c.stream([4, 5, 6], max_new_tokens=n, ignore_eos=True) as b:
            next(a), next(b)
            with pytest.raises(errors.ResourceExhaustedError, match="max_concurrent_streams"):
                c.generate([1, 2], max_new_tokens=2)
        end = time.monotonic() + 10
        while c.server_info().stats.active_calls and time.monotonic() < end:  # cancellation is asynchronous
            time.sleep(0.05)
        assert c.generate([1, 2], max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2


@pytest.mark.parametrize("method", ["GetModelInfo", "GetExpertLoad", "GetServerInfo", "Generate"])
def test_garbage_bytes_meet_the_token_check_first(secure_server, method):
    """Auth is checked before the bytes are judged: garbage without (or with a wrong) token is
    UNAUTHENTICATED, with the right token INVALID_ARGUMENT; nothing is logged as an error."""
    from tests.rpc.test_grpc_server import GARBAGE, raw_call

    creds = grpc.ssl_channel_credentials(open(secure_server.cert, "rb").read())
    options = (("grpc.ssl_target_name_override", "localhost"),)
    target = f"localhost:{secure_server.port}"
    before = secure_server.log().count("\n")
    for metadata, want in [((), grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.INVALID_ARGUMENT)]:
        for _ in range(5):
            err = raw_call(target, method, GARBAGE, metadata=metadata, credentials=creds)
            assert err is not None and err.code() == want, (metadata, err)
    time.sleep(0.2)
    new = secure_server.log().splitlines()[before:]
    assert not [line for line in new if "Traceback" in line or "ERROR" in line], "\n".join(new)
    assert len(new) <= 15, "\n".join(new)


@pytest.mark.parametrize("case, needle", [
    ("not PEM", "server.tls_cert"),
    ("key of another certificate", "does not match"),
    ("cert and key swapped", "swapped"),
    ("key is not PEM", "server.tls_key"),
])
def test_bad_tls_files_are_named_at_start_up(tmp_path, case, needle):
    """Each TLS mistake is one paragraph naming it, exit code 2, before the port opens (it
    used to be reported as 'cannot listen ... the port is in use')."""
    import sys

    from tests.helpers.server_process import ROOT

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, key = self_signed_cert(tmp_path / "a")
    _, other_key = self_signed_cert(tmp_path / "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    files = {"not PEM": (str(garbage), key), "key of another certificate": (cert, other_key),
             "cert and key swapped": (key, cert), "key is not PEM": (cert, str(garbage))}[case]
    run = subprocess.run([sys.executable, "-m", "server", "server.port=0", f"server.tls_cert={files[0]}",
                          f"server.tls_key={files[1]}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert needle in run.stderr and "port is in use" not in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
