"""One real server for the HTTP front-end tests: gRPC and the OpenAI-compatible front end on
the tiny model, with a bearer token (both front ends take the same one)."""
from __future__ import annotations

import pytest

from clients import Client
from tests.helpers.server_process import ServerProcess

TOKEN = "http-front-end-token"


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("http"), f"server.auth_token={TOKEN}", http=True,
                       wait_ready=False) as srv:
        srv.wait_ready(token=TOKEN)
        yield srv


@pytest.fixture(scope="package")
def grpc_client(server):
    with Client(server.target, token=TOKEN, timeout=60) as c:
        yield c
