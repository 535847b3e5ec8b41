"""Incremental detokenization: turn a growing token list into text deltas.

Decoding token by token breaks multi-byte characters (byte-level BPE) and word-boundary
spaces (SentencePiece). So each step decodes a short window — a few tokens already emitted
plus the new ones — and emits only what the window adds beyond the already-emitted part; a
delta ending in U+FFFD (an incomplete UTF-8 sequence) is held back until the next token
completes it, or released by `flush()` when the sequence ends.
"""
from __future__ import annotations

from typing import Any, Callable

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # tokens of already-emitted text decoded again for context


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], prompt_token_ids: list[int] | tuple[int, ...]) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # window start: decode(ids[prefix:read]) is text already emitted
        self._read = len(self._ids)  # tokens up to here are emitted

    def add(self, token_id: int) -> str:
        """Append one token; return the new text that is safe to emit now (may be '')."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def add_many(self, token_ids: list[int]) -> str:
        """Append several tokens (two decodes in all, not two per token); the new safe text."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Release held-back text (an incomplete character stays as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT)):
            return ""
        delta = full_text[len(prefix_text):]
        # The emitted window becomes the next call's context; older ids are no longer needed.
        del self._ids[:self._read]
        self._prefix, self._read = 0, len(self._ids)
        return delta


def fast_decode(tokenizer: Any) -> Callable[[list[int]], str]:
    """`decode(ids)` with special tokens skipped, as streamed. A fast (Rust) tokenizer's
    backend decodes a short window ~10x quicker than the transformers wrapper, and gives the
    same text unless the wrapper cleans up tokenization spaces afterwards."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)
