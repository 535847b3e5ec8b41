"""The client's typed generation keywords stay in step with the request they build."""
from __future__ import annotations

import inspect

import pytest

from clients import AsyncClient, Client, convert
from clients.options import ACCEPTED, GenerateOptions, request_from_options


def test_every_typed_keyword_builds_a_request_field_and_back():
    built = set(inspect.signature(convert.build_request).parameters) - {"prompt"}
    assert set(ACCEPTED) - {"max_tokens"} == built


@pytest.mark.parametrize("method", [Client.generate, Client.stream, AsyncClient.generate, AsyncClient.stream])
def test_methods_declare_the_typed_keywords(method):
    options = inspect.signature(method).parameters["options"]
    assert options.kind is inspect.Parameter.VAR_KEYWORD
    assert "GenerateOptions" in str(options.annotation)  # Unpack[GenerateOptions]: IDEs list each keyword


def test_max_tokens_sets_max_new_tokens_on_the_wire():
    assert request_from_options("x", {"max_tokens": 7}).max_new_tokens == 7
    assert request_from_options("x", {"max_new_tokens": 7, "max_tokens": 7}).max_new_tokens == 7
    assert not request_from_options("x", {}).HasField("max_new_tokens")
    with pytest.raises(TypeError, match="accepted: max_new_tokens, max_tokens, temperature"):
        request_from_options("x", {"temprature": 0.5})
    assert "max_tokens" in GenerateOptions.__annotations__


def test_n_top_and_prompt_logprobs_reach_the_request():
    req = request_from_options("x", {"n": 3, "top_logprobs": 5, "prompt_logprobs": True})
    assert (req.n, req.top_logprobs, req.prompt_logprobs) == (3, 5, True)
    plain = request_from_options("x", {"n": 1, "top_logprobs": None})
    assert not plain.HasField("n") and plain.top_logprobs == 0 and not plain.prompt_logprobs


@pytest.mark.parametrize("options, error, words", [
    ({"n": 0}, ValueError, r"n: must be in \[1, 16\], got 0"),
    ({"n": 17}, ValueError, r"n: must be in \[1, 16\], got 17"),
    ({"n": True}, TypeError, "n: must be an int, got bool"),
    ({"n": 2.0}, TypeError, "n: must be an int, got float"),
    ({"top_logprobs": 21}, ValueError, r"top_logprobs: must be in \[0, 20\], got 21"),
    ({"top_logprobs": -1}, ValueError, r"top_logprobs: must be in \[0, 20\]"),
    ({"top_logprobs": "5"}, TypeError, "top_logprobs: must be an int, got str"),
    ({"prompt_logprobs": 1}, TypeError, "prompt_logprobs: must be True or False, got int"),
])
def test_bad_n_top_and_prompt_logprobs_name_the_keyword(options, error, words):
    with pytest.raises(error, match=words):
        request_from_options("x", options)
