"""When a sequence ends on a token: the rule EngineCore applies to every sampled token.

Checked in this order: a stop token id or EOS (unless `ignore_eos`) -> STOP; `max_new_tokens`
generated, or the sequence reached its length cap (max_model_len) -> LENGTH. The stopping
token's id is returned in the stream and counted in usage, but its text is not added to the
output. Stop strings are the front end's (server/frontend/stop_strings.py): text never
reaches the core.
"""
from __future__ import annotations

from ..engine.api import FinishReason
from .sequence import Sequence


def token_stop_reason(seq: Sequence, token: int, eos_token_ids: frozenset[int]) -> FinishReason | None:
    """Finish reason caused by `seq`'s newest token `token` (already appended), if any."""
    if is_stop_token(seq, token, eos_token_ids):
        return FinishReason.STOP
    if seq.num_generated >= seq.request.stops.max_new_tokens or len(seq) >= seq.max_total_len:
        return FinishReason.LENGTH
    return None


def is_stop_token(seq: Sequence, token: int, eos_token_ids: frozenset[int]) -> bool:
    stops = seq.request.stops
    return token in stops.stop_token_ids or (not stops.ignore_eos and token in eos_token_ids)
