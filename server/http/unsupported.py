"""OpenAI request fields the engine cannot serve yet, refused with a 400 that names them.

Silently ignoring a sampling field gives a user wrong results with no sign of it; a clear
refusal tells them at once. Each entry says when a value needs a missing engine feature
(the defaults that change nothing pass). Wiring a feature later is one place: drop its entry
here and map the field in request_map.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import HttpError
from .fields import Fields

COMPLETIONS, CHAT = "completions", "chat"


@dataclass(frozen=True)
class Unsupported:
    field: str
    needs: Callable[[Any], bool]  # True when this value asks for the missing feature
    feature: str  # what the engine lacks, as the error message says it
    endpoints: tuple[str, ...] = (COMPLETIONS, CHAT)


def _not(*defaults: Any) -> Callable[[Any], bool]:
    return lambda value: value is not None and value not in defaults


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


UNSUPPORTED: tuple[Unsupported, ...] = (
    Unsupported("best_of", _not(1), "ranking several sequences by likelihood (best_of > 1; n > 1 works)",
                (COMPLETIONS,)),
    # vLLM's extension, in its own shape; OpenAI's way, echo with logprobs, works on /v1/completions
    Unsupported("prompt_logprobs", _positive, "vLLM's prompt_logprobs field (use echo with logprobs)"),
    Unsupported("logit_bias", lambda v: bool(v), "logit_bias"),
    Unsupported("suffix", lambda v: bool(v), "suffix (insertion)", (COMPLETIONS,)),
    Unsupported("skip_special_tokens", _not(True), "keeping special tokens in the text"),
    Unsupported("tools", lambda v: bool(v), "tool calls", (CHAT,)),
    Unsupported("tool_choice", _not("none"), "tool calls", (CHAT,)),
    Unsupported("functions", lambda v: bool(v), "function calls", (CHAT,)),
    Unsupported("response_format", lambda v: not (isinstance(v, dict) and v.get("type") == "text"),
                "structured output (response_format other than text)", (CHAT,)),
)


def refuse_unsupported(fields: Fields, endpoint: str) -> None:
    """HttpError 400 for the first field whose value needs a feature the engine lacks."""
    for entry in UNSUPPORTED:
        if endpoint in entry.endpoints:
            value = fields.get(entry.field)
            if value is not None and entry.needs(value):
                raise HttpError(400, f"{entry.field}={value!r}: epserve does not support {entry.feature} yet",
                                param=entry.field, code="unsupported_parameter")
