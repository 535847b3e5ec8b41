"""The keyword arguments of generate() / stream(), typed in one place for both clients.

`GenerateOptions` is a TypedDict, so `**options: Unpack[GenerateOptions]` shows IDEs and type
checkers every accepted keyword with its type, while the four methods that take them
(Client and AsyncClient, generate and stream) share one definition. At run time
`request_from_options` refuses a keyword it does not know with a TypeError that lists the
accepted ones, instead of one that names an internal function, and a keyword of the wrong
type (TypeError) or out of its documented range (ValueError, ranges from generation.proto)
with an error that names it: `logprobs=5` or `n=True` would otherwise reach the server as
something else than was meant.
"""
from __future__ import annotations

from typing import Any, Sequence, TypedDict

from . import convert
from .pb import generation_pb2 as gen_pb


class GenerateOptions(TypedDict, total=False):
    """Generation options; unset ones take the server's defaults (greedy, 16 new tokens)."""

    max_new_tokens: int  # new tokens to generate, in [1, max_model_len]
    max_tokens: int  # the OpenAI name of max_new_tokens (an alias: give one of the two)
    temperature: float  # 0 is greedy
    top_p: float  # nucleus mass in (0, 1]
    top_k: int  # 0: no top-k cut
    min_p: float  # drop tokens below min_p x the most likely one's probability; 0: off
    repetition_penalty: float  # > 1 discourages tokens already in the prompt or output (1: off)
    presence_penalty: float  # in [-2, 2]: minus this from every token already generated
    frequency_penalty: float  # in [-2, 2]: minus this times each token's count so far
    min_tokens: int  # EOS and stops cannot end the output before this many tokens
    seed: int  # reproducible sampling
    stop: str | Sequence[str]  # stop strings (not part of the text)
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: bool  # the log-probability of each sampled token (True or False, not a count)
    top_logprobs: int  # in [0, 20]: also each position's N most likely tokens (Completion.top_logprobs)
    prompt_logprobs: bool  # each prompt token's log-probability after the first (Completion.prompt_logprobs)
    n: int  # in [1, 16]: independent sequences from the prompt (Completion.choices; Chunk.index)
    request_id: str  # at most 128 printable ASCII characters; the server picks one when empty
    text_output: bool  # False: token ids only (no detokenizing)
    return_routed_experts: bool  # Completion.routed_experts: [rows][MoE layers][k]
    include_prompt: bool  # with return_routed_experts: the prompt's rows too


ACCEPTED = tuple(GenerateOptions.__annotations__)
_ALIASES = {"max_tokens": "max_new_tokens"}
MAX_TOP_LOGPROBS = 20  # GenerateRequest.top_logprobs
MAX_N = 16  # GenerateRequest.n
_INT_RANGES = {"top_logprobs": (0, MAX_TOP_LOGPROBS), "n": (1, MAX_N)}
_BOOLS = ("prompt_logprobs",)


def _check_types(options: dict[str, Any]) -> None:
    for name, (low, high) in _INT_RANGES.items():
        value = options.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: must be an int, got {type(value).__name__} {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{name}: must be in [{low}, {high}], got {value}")
    for name in _BOOLS:
        value = options.get(name)
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name}: must be True or False, got {type(value).__name__} {value!r}")


def normalize(options: dict[str, Any]) -> dict[str, Any]:
    """Check the keywords and resolve aliases: the keyword arguments of convert.build_request."""
    unknown = sorted(set(options) - set(ACCEPTED))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                        f"accepted: {', '.join(ACCEPTED)}")
    out = dict(options)
    for alias, name in _ALIASES.items():
        if alias in out:
            if name in out and out[name] is not None and out[alias] is not None and out[name] != out[alias]:
                raise TypeError(f"{alias} is an alias of {name}: give one of them, not both "
                                f"({alias}={out[alias]!r}, {name}={out[name]!r})")
            value = out.pop(alias)
            if out.get(name) is None:
                out[name] = value
    _check_types(out)
    return {k: v for k, v in out.items() if not (k in _INT_RANGES or k in _BOOLS) or v is not None}


def request_from_options(prompt: str | Sequence[int], options: dict[str, Any]) -> gen_pb.GenerateRequest:
    return convert.build_request(prompt, **normalize(options))
