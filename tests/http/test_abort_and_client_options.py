"""gRPC Abort(request_id) for gRPC and HTTP calls, request ids on every chunk, the client's
typed keywords (max_tokens alias, TypeError naming the accepted ones) and the CLI's
`--stream --json`, against the real server."""
from __future__ import annotations

import contextlib
import io
import json
import threading
import time

import openai
import pytest

from clients import Client, FinishReason, NotFoundError
from clients.errors import InvalidRequestError
from clients.cli import main as cli_main
from clients.options import ACCEPTED, normalize
from tests.http.conftest import TOKEN

LONG = 1500  # more tokens than a test ever waits for


def wait_idle(client: Client, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while client.server_info().stats.running_sequences or client.server_info().stats.active_calls:
        assert time.monotonic() < end, "the aborted call still holds the engine"
        time.sleep(0.05)


def test_every_chunk_carries_the_request_id(grpc_client):
    chunks = list(grpc_client.stream("import os", max_new_tokens=6, ignore_eos=True))
    ids = {c.request_id for c in chunks}
    assert len(chunks) > 2 and len(ids) == 1 and ids != {""}  # the server chose it, and said so from the first
    assert {c.request_id for c in grpc_client.stream("x", max_new_tokens=3, request_id="mine")} == {"mine"}


def test_abort_ends_a_stream_with_cancelled_and_frees_the_sequence(server, grpc_client):
    with Client(server.target, token=TOKEN) as other, \
            grpc_client.stream("import os", max_new_tokens=LONG, ignore_eos=True, request_id="abort-me") as s:
        first = next(s)
        assert first.request_id == "abort-me"
        assert other.abort("abort-me") == 1
        rest = list(s)
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    assert 0 < rest[-1].usage.completion_tokens < LONG
    wait_idle(grpc_client)
    with pytest.raises(NotFoundError, match="abort-me"):
        grpc_client.abort("abort-me")


def test_abort_ends_a_unary_generate(server, grpc_client):
    result = {}
    worker = threading.Thread(target=lambda: result.update(c=grpc_client.generate(
        "def f():", max_new_tokens=LONG, ignore_eos=True, request_id="unary-abort")))
    worker.start()
    with Client(server.target, token=TOKEN) as other:
        end = time.monotonic() + 30
        while True:
            try:
                other.abort("unary-abort")
                break
            except NotFoundError:  # not admitted yet
                assert time.monotonic() < end
                time.sleep(0.02)
    worker.join(30)
    assert result["c"].finish_reason is FinishReason.CANCELLED and result["c"].usage.completion_tokens < LONG


def test_abort_finds_http_calls_by_their_response_id(server, grpc_client):
    oa = openai.OpenAI(base_url=server.http_base_url, api_key=TOKEN, max_retries=0)
    stream = oa.completions.create(model="tiny", prompt="import os", max_tokens=LONG, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert grpc_client.abort(first.id) == 1
    finishes = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finishes[-1] == "abort"
    wait_idle(grpc_client)


def test_http_client_hanging_up_frees_the_sequence(server, grpc_client):
    oa = openai.OpenAI(base_url=server.http_base_url, api_key=TOKEN, max_retries=0)
    stream = oa.completions.create(model="tiny", prompt="import os", max_tokens=LONG, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    wait_idle(grpc_client)


def test_max_tokens_is_an_alias_and_unknown_keywords_name_the_accepted_ones(grpc_client):
    assert grpc_client.generate("hello", max_tokens=5, ignore_eos=True).usage.completion_tokens == 5
    with pytest.raises(TypeError) as err:
        grpc_client.generate("hello", max_tokenz=5)
    assert "max_tokenz" in str(err.value) and all(name in str(err.value) for name in ACCEPTED)
    with pytest.raises(TypeError, match="alias of max_new_tokens"):
        normalize({"max_tokens": 3, "max_new_tokens": 4})
    assert normalize({"max_tokens": 3}) == {"max_new_tokens": 3}
    with pytest.raises(InvalidRequestError, match="logprobs"):  # a count is not read as True
        grpc_client.generate("hello", logprobs=5)


def test_cli_stream_json_prints_one_json_line_per_chunk(server):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["--target", server.target, "--token", TOKEN, "generate", "import os",
                         "--max-new-tokens", "5", "--ignore-eos", "--stream", "--json"])
    assert code == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    # one line per message; a reader that falls behind gets ready tokens merged into one message
    # (frontend/stream.py), so on a busy machine 5 tokens may come as fewer than 5 lines
    assert lines and all(line["request_id"] for line in lines)
    assert [line["finish_reason"] for line in lines][-1] == "length"
    assert sum(len(line["token_ids"]) for line in lines) == 5
