"""Stop strings, matched where the text is (the front end; the core aborts the request on a match).

The output is cut just before the earliest match. Text that might be the start of a stop
string is held back until it either completes a match (and is dropped) or cannot anymore (and
is released); at the end of the sequence whatever is held back is released.
"""
from __future__ import annotations


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
