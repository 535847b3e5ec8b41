"""The engine's own request invariants, asserted once at admission.

Validation proper (proto field names, server limits, defaults, tokenization) is the gRPC
layer's, in one place: server/rpc/validation.py, which answers INVALID_ARGUMENT naming the
field. The engine does not repeat it. It asserts only what a step relies on (a prompt that
leaves room for one new token, ids inside the vocabulary, sampling values the sampler can
use, at least one token to generate), so that an in-process caller that builds a
GenerationRequest by hand (the bench, the eval, tests) gets an InvalidRequestError naming the
GenerationRequest field at submit time instead of a failed engine step. Every check is a few
C-level operations (the id checks are `set(map(type, ...))`, `min` and `max`), so a request
the gRPC layer has already validated pays next to nothing for it.
"""
from __future__ import annotations

import math

from ..engine.api import MAX_N, MAX_TOP_LOGPROBS, GenerationRequest, InvalidRequestError

_INTS = {int}


def _ids_in_vocab(ids: tuple[int, ...], vocab_size: int) -> bool:
    return not ids or (set(map(type, ids)) == _INTS and min(ids) >= 0 and max(ids) < vocab_size)


def _first_bad_id(ids: tuple[int, ...], vocab_size: int) -> object:
    """Only on failure: the id to name in the message."""
    return next(t for t in ids if type(t) is not int or not 0 <= t < vocab_size)


def _number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def check_invariants(req: GenerationRequest, *, vocab_size: int, max_model_len: int) -> None:
    """Raise InvalidRequestError naming the first GenerationRequest field the engine cannot run."""
    ids, sp, st = req.prompt_token_ids, req.sampling, req.stops
    if not 0 < len(ids) < max_model_len:
        raise InvalidRequestError("prompt_token_ids", f"the prompt has {len(ids)} tokens; it needs 1 to "
                                  f"{max_model_len - 1} (max_model_len {max_model_len} leaves room for one new token)")
    if not _ids_in_vocab(ids, vocab_size):
        raise InvalidRequestError("prompt_token_ids", f"token id {_first_bad_id(ids, vocab_size)!r} is not an int "
                                  f"in the vocabulary [0, {vocab_size})")
    if not (_number(sp.temperature) and sp.temperature >= 0):
        raise InvalidRequestError("sampling.temperature", f"must be a finite number >= 0, got {sp.temperature!r}")
    if not (_number(sp.top_p) and 0 < sp.top_p <= 1):
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {sp.top_p!r}")
    if not (type(sp.top_k) is int and sp.top_k >= 0):
        raise InvalidRequestError("sampling.top_k", f"must be an int >= 0 (0: no cut), got {sp.top_k!r}")
    if not (sp.seed is None or type(sp.seed) is int):
        raise InvalidRequestError("sampling.seed", f"must be an int or None, got {sp.seed!r}")
    if not (type(st.max_new_tokens) is int and st.max_new_tokens >= 1):
        raise InvalidRequestError("stops.max_new_tokens", f"must be an int >= 1, got {st.max_new_tokens!r}")
    if not all(type(s) is str and s for s in st.stop):
        raise InvalidRequestError("stops.stop", "stop strings must be non-empty strings")
    if not _ids_in_vocab(st.stop_token_ids, vocab_size):
        raise InvalidRequestError("stops.stop_token_ids", f"token id {_first_bad_id(st.stop_token_ids, vocab_size)!r} "
                                  f"is not an int in the vocabulary [0, {vocab_size})")
    if not (_number(sp.min_p) and 0 <= sp.min_p <= 1):
        raise InvalidRequestError("sampling.min_p", f"must be in [0, 1], got {sp.min_p!r}")
    if not (_number(sp.repetition_penalty) and sp.repetition_penalty > 0):
        raise InvalidRequestError("sampling.repetition_penalty", f"must be a finite number > 0, got {sp.repetition_penalty!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not _number(getattr(sp, name)):
            raise InvalidRequestError(f"sampling.{name}", f"must be a finite number, got {getattr(sp, name)!r}")
    if not (type(st.min_tokens) is int and 0 <= st.min_tokens):
        raise InvalidRequestError("stops.min_tokens", f"must be an int >= 0, got {st.min_tokens!r}")
    if st.min_tokens and len(st.stop_token_ids) > 64:
        raise InvalidRequestError("stops.stop_token_ids", "at most 64 ids with min_tokens (held back on the device)")
    if not (type(req.top_logprobs) is int and 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS):
        raise InvalidRequestError("top_logprobs", f"must be an int in [0, {MAX_TOP_LOGPROBS}], got {req.top_logprobs!r}")
    if not (type(req.n) is int and 1 <= req.n <= MAX_N):
        raise InvalidRequestError("n", f"must be an int in [1, {MAX_N}], got {req.n!r}")
