"""When a sequence ends: token-level stops and stop strings.

Token-level (checked on each sampled token, in this order): a stop token id or EOS (unless
`ignore_eos`) -> STOP; `max_new_tokens` generated, or the sequence reached its length cap
(max_model_len) -> LENGTH. The stopping token's id is returned in the stream and counted in
usage, but its text is not added to the output.

Stop strings are matched on the decoded text: the output is cut just before the earliest
match. Text that might be the start of a stop string is held back until it either completes
a match (and is dropped) or cannot anymore (and is released); at the end of the sequence
whatever is held back is released.
"""
from __future__ import annotations

from .api import FinishReason
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


class StopStringMatcher:
    """Feed text deltas; get back what may be emitted and whether a stop string matched."""

    def __init__(self, stop: tuple[str, ...] | list[str]) -> None:
        self.stop = tuple(stop)
        self._pending = ""  # held-back suffix: the longest one that starts some stop string

    def feed(self, delta: str) -> tuple[str, bool]:
        """-> (text safe to emit, matched). After a match nothing more should be fed."""
        text = self._pending + delta
        if not self.stop:
            self._pending = ""
            return text, False
        # Only `text` can hold a new match: emitted text before it held no stop-string prefix.
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._pending = ""
            return text[:min(hits)], True
        hold = self._held_suffix_len(text)
        self._pending = text[len(text) - hold:]
        return text[:len(text) - hold], False

    def flush(self) -> str:
        """Release the held-back text (the sequence ended for another reason)."""
        text, self._pending = self._pending, ""
        return text

    def _held_suffix_len(self, text: str) -> int:
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
