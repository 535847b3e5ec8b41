"""What a call has received so far (shared by the sync and asyncio clients, streams and Generate).

With n > 1 the server interleaves the sequences' messages (GenerateResponse.index), each ending
with its own finish reason and usage; Generate answers with one reply per sequence in
`choices`. Both land here per index, so a stream's `completion` and generate() give the same
Completion, its `choices` holding every sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .convert import chunk_from_pb
from .errors import ServerError
from .pb import generation_pb2 as gen_pb
from .types import Chunk, Completion


@dataclass
class _Sequence:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list = field(default_factory=list)
    prompt_logprobs: tuple[float, ...] | None = None
    prompt_tops: tuple | None = None
    routed: list[list[list[int]]] | None = None
    last: Chunk | None = None


class StreamState:
    """Accumulates chunks into text, token ids and logprobs per sequence; knows when all are done.
    `logprobs`, `top`, `prompt`: what the request asked for; `n`: how many sequences it runs."""

    def __init__(self, logprobs: bool, top: bool = False, prompt: bool = False, n: int = 1) -> None:
        self.logprobs, self.top, self.prompt, self.n = logprobs, top, prompt, n
        self._seqs = [_Sequence() for _ in range(n)]
        self.last: Chunk | None = None

    @classmethod
    def of(cls, request: gen_pb.GenerateRequest) -> "StreamState":
        top = request.top_logprobs > 0
        n = request.n if request.HasField("n") and request.n > 0 else 1
        return cls(request.logprobs or top, top, request.prompt_logprobs, n)

    def add(self, msg: gen_pb.GenerateResponse) -> Chunk:
        chunk = chunk_from_pb(msg, self.logprobs, self.top, self.prompt)
        if not 0 <= chunk.index < self.n:
            raise ServerError(f"a message for sequence {chunk.index}; the request asked for {self.n}")
        seq = self._seqs[chunk.index]
        seq.text.append(chunk.text)
        seq.token_ids.extend(chunk.token_ids)
        seq.logprobs.extend(chunk.logprobs or ())
        seq.tops.extend(chunk.top_logprobs or ())
        if chunk.prompt_logprobs is not None:
            seq.prompt_logprobs, seq.prompt_tops = chunk.prompt_logprobs, chunk.prompt_top_logprobs
        if chunk.routed_experts is not None:
            seq.routed = (seq.routed or []) + chunk.routed_experts
        seq.last = self.last = chunk
        return chunk

    def add_reply(self, reply: gen_pb.GenerateResponse) -> None:
        """Generate's reply: the sequence itself, or with n > 1 one reply per sequence in `choices`."""
        for msg in reply.choices or [reply]:
            self.add(msg)

    @property
    def finished(self) -> bool:
        return all(s.last is not None and s.last.finish_reason is not None for s in self._seqs)

    def check_finished(self) -> None:
        """A stream that ended cleanly must have ended with every sequence's final message."""
        if not self.finished:
            raise ServerError("stream ended without a final message (finish_reason and usage)")

    def completion(self) -> Completion:
        if not self.finished or any(s.last.usage is None for s in self._seqs):
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        done = [self._completion(i, s) for i, s in enumerate(self._seqs)]
        return done[0] if self.n == 1 else replace(done[0], choices=tuple(done))

    def _completion(self, index: int, seq: _Sequence) -> Completion:
        last = seq.last
        return Completion(
            text="".join(seq.text),
            token_ids=tuple(seq.token_ids),
            finish_reason=last.finish_reason,
            usage=last.usage,
            logprobs=tuple(seq.logprobs) if self.logprobs else None,
            request_id=last.request_id,
            routed_experts=seq.routed,
            top_logprobs=tuple(seq.tops) if self.top else None,
            prompt_logprobs=(seq.prompt_logprobs or ()) if self.prompt and index == 0 else None,
            prompt_top_logprobs=(seq.prompt_tops or ()) if self.prompt and self.top and index == 0 else None,
            index=index,
        )
