"""Request validation without a server: each bad request names its field; defaults are right."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings

from clients.pb import generation_pb2 as g
from server.engine.api import InvalidRequestError
from server.frontend.request_checks import check_invariants
from server.rpc.received import parse_generate_request
from server.rpc.validation import DEFAULT_MAX_NEW_TOKENS, RequestLimits, validate_request
from tests.helpers.bad_requests import BAD_REQUESTS, Limits, good
from tests.helpers.request_strategies import generate_requests

LIMITS = RequestLimits(vocab_size=256, max_model_len=32)


def utf8_bytes(text: str) -> list[int]:
    """A byte-level encoder (each UTF-8 byte one token): validation needs some tokenizer."""
    return list(text.encode("utf-8"))


def validate(data: bytes):
    return validate_request(parse_generate_request(data), LIMITS, utf8_bytes)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=lambda c: c.name)
def test_bad_request_names_the_field(case):
    with pytest.raises(InvalidRequestError) as err:
        validate(case.build(Limits(LIMITS.vocab_size, LIMITS.max_model_len)))
    assert err.value.field == case.field, str(err.value)
    assert str(err.value).startswith(f"{case.field}: ")


def test_defaults_for_unset_fields():
    req = g.GenerateRequest(text="hi")
    valid = validate(req.SerializeToString())
    e = valid.engine_request
    assert e.prompt_token_ids == tuple(b"hi")
    assert e.stops.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert (e.sampling.temperature, e.sampling.top_p, e.sampling.top_k, e.sampling.seed) == (0.0, 1.0, 0, None)
    assert e.stops.stop == () and e.stops.stop_token_ids == () and not e.stops.ignore_eos and not e.logprobs
    assert len(e.request_id) == 32 and valid.text_output


def test_set_fields_pass_through():
    req = good(max_new_tokens=31, sampling=dict(temperature=0.7, top_p=0.9, top_k=5, seed=2**64 - 1),
               stop=["\n", "é" * 128], stop_token_ids=[0, 255], ignore_eos=True, logprobs=True,
               request_id="req-1", output_format=g.OUTPUT_FORMAT_TOKEN_IDS)
    valid = validate(req.SerializeToString())
    e = valid.engine_request
    assert e.prompt_token_ids == (1, 2, 3) and e.stops.max_new_tokens == 31
    assert e.sampling.temperature == pytest.approx(0.7) and e.sampling.top_p == pytest.approx(0.9)
    assert e.sampling.top_k == 5 and e.sampling.seed == 2**64 - 1
    assert e.stops.stop == ("\n", "é" * 128) and e.stops.stop_token_ids == (0, 255)
    assert e.stops.ignore_eos and e.logprobs and e.request_id == "req-1" and not valid.text_output


def test_top_k_at_or_above_vocab_means_no_cut():
    valid = validate(good(sampling=dict(top_k=LIMITS.vocab_size)).SerializeToString())
    assert valid.engine_request.sampling.top_k == 0


def test_longest_prompt_that_fits():
    ids = [1] * (LIMITS.max_model_len - 1)
    assert validate(good(token_ids=g.TokenIds(ids=ids)).SerializeToString()).engine_request.prompt_token_ids == tuple(ids)


def test_both_prompt_kinds_are_seen_on_the_wire():
    """The second (C) parse sees each prompt member that is on the wire, in either order."""
    text, ids = g.GenerateRequest(text="hi"), g.GenerateRequest(token_ids=g.TokenIds(ids=[1]))
    for data in (text.SerializeToString() + ids.SerializeToString(), ids.SerializeToString() + text.SerializeToString()):
        assert set(parse_generate_request(data).prompt_kinds) == {"text", "token_ids"}
    assert parse_generate_request(good().SerializeToString()).prompt_kinds == ("token_ids",)


def test_millions_of_unknown_fields_parse_at_c_speed():
    """~2M tiny unknown fields (4 MB) cost the parser milliseconds, not the seconds a Python
    walk over wire records took; the request is still understood."""
    import time

    flood = bytes([15 << 3, 0]) * 2_000_000 + good().SerializeToString()
    start = time.perf_counter()
    received = parse_generate_request(flood)
    assert time.perf_counter() - start < 0.5
    assert received.decode_error is None and received.prompt_kinds == ("token_ids",)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=generate_requests(LIMITS.vocab_size, LIMITS.max_model_len))
def test_fuzz_every_request_is_either_valid_or_named_invalid(data):
    """Never anything but InvalidRequestError, and what passes meets the engine's rules."""
    try:
        valid = validate(data)
    except InvalidRequestError as exc:
        assert exc.field and str(exc).startswith(f"{exc.field}: ")
        return
    e = valid.engine_request
    assert 0 < len(e.prompt_token_ids) < LIMITS.max_model_len
    assert all(0 <= t < LIMITS.vocab_size for t in e.prompt_token_ids + e.stops.stop_token_ids)
    s = e.sampling
    assert math.isfinite(s.temperature) and s.temperature >= 0 and 0 < s.top_p <= 1
    assert 0 <= s.top_k < LIMITS.vocab_size and 1 <= e.stops.max_new_tokens <= LIMITS.max_model_len
    assert all(s for s in e.stops.stop) and len(e.request_id) <= 128
    check_invariants(e, vocab_size=LIMITS.vocab_size, max_model_len=LIMITS.max_model_len)  # the engine admits it
