"""OpenAI response objects: completions and chat, whole or as server-sent-event chunks.

Shapes follow OpenAI's API reference (text_completion, chat.completion, chat.completion.chunk),
with vLLM's "abort" finish reason for calls the server ended. epserve extensions ride as
extra fields: `routing` (the active policy) on every response object and on the last chunk,
`routed_experts` on a choice when the request set return_routed_experts, and `token_ids`
with return_token_ids.
"""
from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from server.engine.api import FinishReason, GenerationChunk

from . import logprob_shapes
from .generation import Tally
from .logprob_shapes import LogprobShapes
from .request_map import HttpGeneration
from .unsupported import CHAT

FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "abort"}
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def json_bytes(obj: Any) -> bytes:
    return _JSON(obj).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + _JSON(obj).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class ChoiceOutput:
    """One choice's text, tokens, log-probabilities and routed-expert rows, as they arrive."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list = field(default_factory=list)  # per token its top-N (token id, logprob), with top_logprobs
    prompt_logprobs: tuple[float, ...] | None = None  # echo with logprobs: the prompt's, from the first chunk
    prompt_tops: tuple | None = None
    routed: list[bytes] = field(default_factory=list)

    def add(self, chunk: GenerationChunk) -> None:
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        if chunk.logprobs is not None:
            self.logprobs.extend(chunk.logprobs)
        if chunk.top_logprobs is not None:
            self.tops.extend(chunk.top_logprobs)
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_tops = chunk.prompt_logprobs, chunk.prompt_top_logprobs
        if chunk.routed_experts is not None:
            self.routed.append(chunk.routed_experts)


class ResponseFormat:
    """Builds the objects of one HTTP request's answer (ids, model, created fixed at the start).
    `prompt_ids` / `prompt_texts`: each choice's prompt, for echo."""

    def __init__(self, gen: HttpGeneration, model: str, routing: dict[str, Any], routed_shape: tuple[int, int],
                 decode_token: Callable[[int], str], prompt_ids: list[tuple[int, ...]],
                 prompt_texts: list[str]) -> None:
        self.gen, self.model, self.routing, self.routed_shape = gen, model, routing, routed_shape
        self.prompt_ids, self.prompt_texts = prompt_ids, prompt_texts
        self.created = int(time.time())
        self.chat = gen.endpoint == CHAT
        self.shapes = LogprobShapes(self.chat, gen.top_logprobs, decode_token)
        self._sent = [0] * gen.layout.total  # characters of each choice's text streamed so far

    # -- pieces ---------------------------------------------------------------------------
    def usage(self, tallies: list[Tally]) -> dict[str, int]:
        prompt = sum(t.prompt_tokens for t in tallies)
        completion = 0 if self.gen.echo_only else sum(t.completion_tokens for t in tallies)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs(self, choice: int, token_ids, logprobs, tops, prompt_lps=None, prompt_tops=None,
                 offset: int = 0) -> dict[str, Any] | None:
        """The logprobs object of `choice`'s tokens (after its prompt's, for echo); None if not asked."""
        if not self.gen.logprobs:
            return None
        scored = []
        if self.gen.echo and prompt_lps is not None:
            scored = logprob_shapes.prompt(self.prompt_ids[choice], prompt_lps, prompt_tops)
        scored += logprob_shapes.generated(token_ids, logprobs, tops if self.gen.top_logprobs else None)
        return self.shapes.build(scored, offset) if scored else None

    def routed_experts(self, rows: list[bytes]) -> dict[str, Any]:
        layers, k = self.routed_shape
        return {"num_layers": layers, "top_k": k, "encoding": "base64 uint16 little-endian [rows, num_layers, top_k]",
                "ids": base64.b64encode(b"".join(rows)).decode()}

    # -- whole responses ------------------------------------------------------------------
    def whole(self, outputs: list[ChoiceOutput], tallies: list[Tally]) -> dict[str, Any]:
        choices = []
        for i, (out, tally) in enumerate(zip(outputs, tallies)):
            text = "".join(out.text)
            finish = FINISH_REASONS.get(tally.finish, "abort")
            echo = self.prompt_texts[i] if self.gen.echo else ""
            logprobs = self.logprobs(i, out.token_ids, out.logprobs, out.tops, out.prompt_logprobs, out.prompt_tops)
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                          "finish_reason": finish}
            else:
                choice = {"index": i, "text": echo + text, "logprobs": logprobs, "finish_reason": finish}
            if self.gen.routed_experts:
                choice["routed_experts"] = self.routed_experts(out.routed)
            if self.gen.token_ids:
                choice["token_ids"] = out.token_ids
            choices.append(choice)
        return {"id": self.gen.request_id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(tallies),
                "routing": self.routing}

    # -- stream chunks --------------------------------------------------------------------
    def chunk(self, index: int, chunk: GenerationChunk | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        """Choice `index`'s event for `chunk`; its first one starts with the prompt, for echo."""
        prefix = self.prompt_texts[index] if self.gen.echo and first else ""
        text = prefix + (chunk.text if chunk is not None else "")
        ids = list(chunk.token_ids) if chunk is not None else []
        logprobs = None
        if chunk is not None:
            logprobs = self.logprobs(index, ids, chunk.logprobs or (), chunk.top_logprobs, chunk.prompt_logprobs,
                                     chunk.prompt_top_logprobs, self._sent[index])
        self._sent[index] += len(text)
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if self.gen.token_ids:
            choice["token_ids"] = ids
        if self.gen.routed_experts and chunk is not None and chunk.routed_experts is not None:
            choice["routed_experts"] = self.routed_experts([chunk.routed_experts])
        obj = {"id": self.gen.request_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "choices": [choice]}
        if self.gen.include_usage:
            obj["usage"] = None
        if finish is not None:
            obj["routing"] = self.routing
        return obj

    def usage_chunk(self, tallies: list[Tally]) -> dict[str, Any]:
        return {"id": self.gen.request_id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage(tallies)}
