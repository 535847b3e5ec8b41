"""Bad HTTP input gets a 4xx in OpenAI's error shape, naming what is wrong, and the server
keeps serving everyone else (a good request right after each bad one is answered)."""
from __future__ import annotations

import http.client
import json

import openai
import pytest

from tests.http.conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
GOOD = {"model": "tiny", "prompt": "import os", "max_tokens": 2, "temperature": 0}


def post(server, path: str, body: bytes, headers=AUTH) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


def assert_still_serving(server):
    status, body = post(server, "/v1/completions", json.dumps(GOOD).encode())
    assert status == 200 and body["usage"]["completion_tokens"] == 2, body


CASES = [  # (name, body bytes, status, param named, words in the message)
    ("malformed JSON", b'{"prompt": "x",', 400, None, "not valid JSON"),
    ("not an object", b'["x"]', 400, None, "JSON object"),
    ("max_tokens a string", json.dumps({**GOOD, "max_tokens": "8"}).encode(), 400, "max_tokens", "integer"),
    ("temperature a bool", json.dumps({**GOOD, "temperature": True}).encode(), 400, "temperature", "number"),
    ("negative temperature", json.dumps({**GOOD, "temperature": -1}).encode(), 400, "temperature", ">= 0"),
    ("top_p out of range", json.dumps({**GOOD, "top_p": 1.5}).encode(), 400, "top_p", "(0, 1]"),
    ("max_tokens zero", json.dumps({**GOOD, "max_tokens": 0}).encode(), 400, "max_tokens", "at least 1"),
    ("max_tokens huge", json.dumps({**GOOD, "max_tokens": 10**6}).encode(), 400, "max_tokens", "max_model_len"),
    ("negative seed", json.dumps({**GOOD, "seed": -3}).encode(), 400, "seed", "out of range"),
    ("prompt a number", json.dumps({**GOOD, "prompt": 5}).encode(), 400, "prompt", "string"),
    ("empty prompt", json.dumps({**GOOD, "prompt": ""}).encode(), 400, "prompt", "empty"),
    ("token id out of vocabulary", json.dumps({**GOOD, "prompt": [1, 99999]}).encode(), 400, "prompt[1]",
     "out of vocabulary"),
    ("prompt past max_model_len", json.dumps({**GOOD, "prompt": [1] * 5000}).encode(), 400, "prompt", "limit"),
    ("stop a number", json.dumps({**GOOD, "stop": 3}).encode(), 400, "stop", "string"),
    ("unknown model", json.dumps({**GOOD, "model": "gpt-4"}).encode(), 404, "model", "not served"),
    ("n above the cap", json.dumps({**GOOD, "n": 17}).encode(), 400, "n", "[1, 16]"),
    ("n zero", json.dumps({**GOOD, "n": 0}).encode(), 400, "n", "[1, 16]"),
    ("logprobs above the cap", json.dumps({**GOOD, "logprobs": 21}).encode(), 400, "logprobs", "[0, 20]"),
    ("negative logprobs", json.dumps({**GOOD, "logprobs": -1}).encode(), 400, "logprobs", "[0, 20]"),
    ("max_tokens zero without echo", json.dumps({**GOOD, "max_tokens": 0, "logprobs": 1}).encode(), 400,
     "max_tokens", "0 only with echo"),
    ("best_of (not yet)", json.dumps({**GOOD, "best_of": 2}).encode(), 400, "best_of", "does not support"),
    ("presence_penalty out of range", json.dumps({**GOOD, "presence_penalty": 5}).encode(), 400, "presence_penalty",
     "[-2, 2]"),
    ("min_p a string", json.dumps({**GOOD, "min_p": "high"}).encode(), 400, "min_p", "number"),
    ("min_tokens past max_tokens", json.dumps({**GOOD, "min_tokens": 50}).encode(), 400, "min_tokens",
     "max_new_tokens"),
    ("routing is read-only", json.dumps({**GOOD, "routing": "greedy_balanced"}).encode(), 400, "routing",
     "read-only"),
    ("huge body", b'{"prompt": "' + b"a" * (5 << 20) + b'"}', 413, None, "max_message_bytes"),
]


@pytest.mark.parametrize("name, body, status, param, words", CASES, ids=[c[0] for c in CASES])
def test_bad_completion_requests_get_openai_errors(server, name, body, status, param, words):
    got, reply = post(server, "/v1/completions", body)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert_still_serving(server)


@pytest.mark.parametrize("messages, param", [
    ("hi", "messages"), ([], "messages"), ([{"content": "x"}], "messages[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
])
def test_bad_chat_messages(server, messages, param):
    got, reply = post(server, "/v1/chat/completions", json.dumps({"model": "tiny", "messages": messages}).encode())
    assert got == 400 and reply["error"]["param"] == param, reply
    assert_still_serving(server)


def test_missing_or_wrong_token_is_401_and_health_stays_open(server):
    for headers in ({"Content-Type": "application/json"}, {**AUTH, "Authorization": "Bearer nope"}):
        got, reply = post(server, "/v1/completions", json.dumps(GOOD).encode(), headers)
        assert got == 401 and "bearer token" in reply["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.http_base_url, api_key="wrong", max_retries=0).models.list()
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    conn.request("GET", "/health")
    reply = conn.getresponse()
    assert (reply.status, reply.read()) == (200, b"SERVING\n")
    conn.request("GET", "/metrics")
    assert b"epserve_requests" in conn.getresponse().read()
    conn.close()
    assert_still_serving(server)


def test_the_openai_client_raises_its_own_error_classes(server):
    c = openai.OpenAI(base_url=server.http_base_url, api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not served"):
        c.completions.create(model="nope", prompt="x")
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match=r"top_logprobs: must be in \[0, 20\]"):
        c.chat.completions.create(model="tiny", messages=messages, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="top_logprobs: needs logprobs: true"):
        c.chat.completions.create(model="tiny", messages=messages, top_logprobs=2)
