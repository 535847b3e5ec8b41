"""What a stream has received so far (shared by the sync and asyncio streams)."""
from __future__ import annotations

from .convert import chunk_from_pb
from .errors import ServerError
from .pb import generation_pb2 as gen_pb
from .types import Chunk, Completion


class StreamState:
    """Accumulates chunks into text, token ids and logprobs; knows when the stream is done."""

    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprob_values: list[float] = []
        self.routed: list[list[list[int]]] | None = None
        self.last: Chunk | None = None

    def add(self, msg: gen_pb.GenerateResponse) -> Chunk:
        chunk = chunk_from_pb(msg, self.logprobs)
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprob_values.extend(chunk.logprobs or ())
        if chunk.routed_experts is not None:
            self.routed = (self.routed or []) + chunk.routed_experts
        self.last = chunk
        return chunk

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finish_reason is not None

    def check_finished(self) -> None:
        """A stream that ended cleanly must have ended with its final message."""
        if not self.finished:
            raise ServerError("stream ended without a final message (finish_reason and usage)")

    def completion(self) -> Completion:
        if not self.finished or self.last is None or self.last.usage is None:
            raise RuntimeError("the stream has not finished: iterate it to the end first")
        return Completion(
            text="".join(self.text),
            token_ids=tuple(self.token_ids),
            finish_reason=self.last.finish_reason,
            usage=self.last.usage,
            logprobs=tuple(self.logprob_values) if self.logprobs else None,
            request_id=self.last.request_id,
            routed_experts=self.routed,
        )
