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
