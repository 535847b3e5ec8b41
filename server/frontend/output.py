"""One request's text side, wherever the text is: new token ids -> a GenerationChunk.

Used by the front end's client of the engine core (server/frontend/client.py), wherever the
core runs. It detokenizes incrementally, matches stop
strings (the caller aborts the request in the core on a match; tokens the core produced after
the matching one are dropped), and keeps usage. Tokens come in batches: one step's token, or
several when the caller has fallen behind; the result is the same token and text sequence.
"""
from __future__ import annotations

import time
from typing import Callable

from ..engine.api import FinishReason, GenerationChunk, GenerationRequest, Usage
from .detokenizer import IncrementalDetokenizer
from .stop_strings import StopStringMatcher


class RequestOutput:
    def __init__(self, request: GenerationRequest, decode: Callable[[list[int]], str], arrival: float | None = None,
                 routed_row_bytes: int = 0, index: int = 0) -> None:
        self.request = request
        self.index = index  # which of the request's n sequences this is (GenerationChunk.index)
        self.routed_row_bytes = routed_row_bytes  # one routed-experts row: MoE layers x top_k x 2 bytes
        self.detok = IncrementalDetokenizer(decode, request.prompt_token_ids)
        self.matcher = StopStringMatcher(request.stops.stop)
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_token_time: float | None = None
        self.num_generated = 0
        self.matched_stop = False  # a stop string ended the request (the caller aborts it in the core)

    def on_tokens(self, token_ids: list[int], logprobs: list[float] | None, reason: FinishReason | None,
                  now: float, routed: bytes | None = None, top: list | None = None,
                  prompt_logprobs: list[float] | None = None, prompt_top: list | None = None) -> GenerationChunk:
        """The chunk for newly sampled tokens. `reason` is the core's finish reason (STOP: the
        last token is a stop token or EOS, whose text is left out; LENGTH). A stop-string match
        ends the request here too: the chunk then has finish_reason STOP and holds the tokens up
        to the one that completed the match (`matched_stop` tells the caller to abort it).
        `top`: [ids, logprobs] of the step's one token (top_logprobs); `prompt_logprobs` (and
        `prompt_top`, [ids, logprobs] per prompt position, with top_logprobs) come with the first token. Stop strings are not matched before min_tokens tokens."""
        first = self.first_token_time is None
        if first:
            self.first_token_time = now
        self.matched_stop = False
        text_ids = token_ids[:-1] if reason is FinishReason.STOP else token_ids
        tops = None
        if self.request.top_logprobs and top is not None:
            tops = (tuple(zip(top[0], top[1])),)
        prompt_lps = prompt_tops = None
        if first and self.request.prompt_logprobs:
            prompt_lps = tuple(prompt_logprobs or ())
            if self.request.top_logprobs:
                ids, lps = prompt_top if prompt_top is not None else ([], [])
                prompt_tops = tuple(tuple(zip(i, lp)) for i, lp in zip(ids, lps))
        if self.num_generated + len(token_ids) <= self.request.stops.min_tokens:
            text = self.detok.add_many(text_ids)  # under min_tokens: no stop string can end it yet
        elif self.matcher.stop:
            text, kept = self._feed_watching_stops(text_ids)
            if kept is not None:
                routed = _keep_rows(routed, self.routed_row_bytes, len(token_ids), kept)
                token_ids, logprobs, reason = token_ids[:kept], logprobs[:kept] if logprobs else logprobs, FinishReason.STOP
        else:
            text, _ = self.matcher.feed(self.detok.add_many(text_ids))
        if reason is not None and not self.matched_stop:
            tail, matched = self.matcher.feed(self.detok.flush())
            text += tail if matched else tail + self.matcher.flush()
        self.num_generated += len(token_ids)
        return GenerationChunk(
            token_ids=tuple(token_ids),
            text=text,
            logprobs=tuple(logprobs) if self.request.logprobs and logprobs is not None else None,
            top_logprobs=tops,
            prompt_logprobs=prompt_lps,
            prompt_top_logprobs=prompt_tops,
            finish_reason=reason,
            usage=self.usage() if reason is not None else None,
            routed_experts=routed,
            index=self.index,
        )

    def _feed_watching_stops(self, token_ids: list[int]) -> tuple[str, int | None]:
        """Token by token (a match must name the token that completed it): -> (text, number of
        tokens kept if a stop string matched, else None)."""
        text = ""
        for i, token in enumerate(token_ids):
            delta, matched = self.matcher.feed(self.detok.add_many([token]))
            text += delta
            if matched:
                self.matched_stop = True
                return text, i + 1
        return text, None

    def usage(self) -> Usage:
        ttft = (self.first_token_time - self.arrival) if self.first_token_time is not None else 0.0
        return Usage(prompt_tokens=len(self.request.prompt_token_ids), completion_tokens=self.num_generated,
                     time_to_first_token_s=ttft)


def _keep_rows(routed: bytes | None, row_bytes: int, num_tokens: int, kept: int) -> bytes | None:
    """Routed-expert rows of the first `kept` of `num_tokens` tokens (one row each, last in
    `routed`); prompt rows before them stay."""
    if not routed or kept >= num_tokens:
        return routed
    return routed[:len(routed) - (num_tokens - kept) * row_bytes]
