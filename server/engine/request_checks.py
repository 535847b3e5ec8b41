"""Request checks done before a request is queued: each failure names the field."""
from __future__ import annotations

import math

from .api import GenerationRequest, InvalidRequestError


def validate_request(req: GenerationRequest, *, vocab_size: int, max_model_len: int) -> None:
    """Raise InvalidRequestError naming the first bad field; the engine admits nothing else."""
    ids = req.prompt_token_ids
    if not ids:
        raise InvalidRequestError("prompt_token_ids", "the prompt is empty")
    if len(ids) >= max_model_len:
        raise InvalidRequestError("prompt_token_ids", f"the prompt has {len(ids)} tokens; max_model_len is "
                                  f"{max_model_len}, which must leave room for at least one new token")
    bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("prompt_token_ids", f"token id {bad!r} is outside the vocabulary [0, {vocab_size})")
    sp, st = req.sampling, req.stops
    if not (isinstance(sp.temperature, (int, float)) and math.isfinite(sp.temperature) and sp.temperature >= 0):
        raise InvalidRequestError("sampling.temperature", f"must be a finite number >= 0, got {sp.temperature!r}")
    if not (isinstance(sp.top_p, (int, float)) and 0 < sp.top_p <= 1):
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {sp.top_p!r}")
    if not isinstance(sp.top_k, int) or sp.top_k < 0:
        raise InvalidRequestError("sampling.top_k", f"must be an integer >= 0 (0: no cut), got {sp.top_k!r}")
    if sp.seed is not None and (not isinstance(sp.seed, int) or isinstance(sp.seed, bool)):
        raise InvalidRequestError("sampling.seed", f"must be an integer, got {sp.seed!r}")
    if not isinstance(st.max_new_tokens, int) or st.max_new_tokens < 1:
        raise InvalidRequestError("stops.max_new_tokens", f"must be an integer >= 1, got {st.max_new_tokens!r}")
    if any(not isinstance(s, str) or not s for s in st.stop):
        raise InvalidRequestError("stops.stop", "stop strings must be non-empty strings")
    bad = next((t for t in st.stop_token_ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("stops.stop_token_ids", f"token id {bad!r} is outside the vocabulary [0, {vocab_size})")
