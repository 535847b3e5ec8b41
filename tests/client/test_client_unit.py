"""Client pieces that need no server: request building, retry policy, error mapping."""
from __future__ import annotations

import grpc
import pytest

from clients import errors
from clients.convert import build_request
from clients.pb import generation_pb2 as g
from clients.retry import Deadline, RetryPolicy


def test_build_request_text_and_ids():
    req = build_request("hi", max_new_tokens=3, temperature=0.5, top_p=0.9, top_k=4, seed=7,
                        stop="\n", stop_token_ids=[5], ignore_eos=True, logprobs=True, request_id="x")
    assert req.WhichOneof("prompt") == "text" and req.text == "hi" and req.max_new_tokens == 3
    assert req.sampling.HasField("top_p") and req.sampling.seed == 7 and list(req.stop) == ["\n"]
    ids = build_request([1, 2, 3])
    assert ids.WhichOneof("prompt") == "token_ids" and list(ids.token_ids.ids) == [1, 2, 3]
    assert not ids.HasField("max_new_tokens") and not ids.sampling.HasField("top_p")
    assert build_request([]).WhichOneof("prompt") == "token_ids"  # the server says what is wrong
    assert build_request("a", text_output=False).output_format == g.OUTPUT_FORMAT_TOKEN_IDS


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(seed=-3), "sampling.seed"),
    (dict(top_k=2**40), "sampling.top_k"),
    (dict(stop=[1]), "stop"),
])
def test_unencodable_values_name_the_field(kwargs, field):
    with pytest.raises(errors.InvalidRequestError, match=field):
        build_request("hi", **kwargs)


def test_negative_token_id_names_the_field():
    with pytest.raises(errors.InvalidRequestError, match="prompt.token_ids"):
        build_request([1, -2])


def test_retry_policy_delays_grow_and_are_bounded():
    delays = list(RetryPolicy(max_attempts=6, initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2, jitter=0).delays())
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert list(RetryPolicy(max_attempts=1).delays()) == []
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_deadline():
    assert Deadline(None).remaining() is None and Deadline(None).allows_sleep(1e9)
    d = Deadline(10.0)
    assert 9.0 < d.remaining() <= 10.0 and d.allows_sleep(1.0) and not d.allows_sleep(11.0)


class _FakeRpcError(grpc.RpcError):
    """grpc.RpcError as raised by a call: code() and details()."""

    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequestError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
    (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
    (grpc.StatusCode.CANCELLED, errors.CancelledError),
    (grpc.StatusCode.UNAUTHENTICATED, errors.AuthenticationError),
    (grpc.StatusCode.INTERNAL, errors.ServerError),
    (grpc.StatusCode.UNKNOWN, errors.ServerError),
])
def test_status_codes_map_to_exception_classes(code, cls):
    exc = errors.from_rpc_error(_FakeRpcError(code, "why"))
    assert type(exc) is cls and exc.code == code.name and exc.details == "why"
    assert isinstance(exc, errors.EpserveError)
