"""Per-request output state on rank 0: sampled tokens -> stream chunks, and when to stop."""
from __future__ import annotations

from typing import Callable

from .api import FinishReason, GenerationChunk, Usage
from .detokenizer import IncrementalDetokenizer
from .sequence import Sequence
from .stops import StopStringMatcher, is_stop_token, token_stop_reason
from .stream import RequestStream


class RequestOutput:
    def __init__(self, seq: Sequence, stream: RequestStream, decode: Callable[[list[int]], str], eos_token_ids: frozenset[int]) -> None:
        self.seq = seq
        self.stream = stream
        self.eos_token_ids = eos_token_ids
        self.detok = IncrementalDetokenizer(decode, seq.request.prompt_token_ids)
        self.matcher = StopStringMatcher(seq.request.stops.stop)

    def on_token(self, token: int, logprob: float | None, now: float) -> GenerationChunk:
        """The chunk for one newly sampled token (its finish_reason set if the sequence ends)."""
        seq = self.seq
        if seq.first_token_time is None:
            seq.first_token_time = now
        reason = token_stop_reason(seq, token, self.eos_token_ids)
        text, matched = "", False
        if not is_stop_token(seq, token, self.eos_token_ids):
            text, matched = self.matcher.feed(self.detok.add(token))
            if matched:
                reason = FinishReason.STOP
        if reason is not None and not matched:
            tail, matched = self.matcher.feed(self.detok.flush())
            text += tail if matched else tail + self.matcher.flush()
        return GenerationChunk(
            token_ids=(token,),
            text=text,
            logprobs=(logprob,) if seq.request.logprobs else None,
            finish_reason=reason,
            usage=self.usage() if reason is not None else None,
        )

    def usage(self) -> Usage:
        seq = self.seq
        ttft = (seq.first_token_time - seq.arrival_time) if seq.first_token_time is not None else 0.0
        return Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_generated, time_to_first_token_s=ttft)
