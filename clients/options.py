"""The keyword arguments of generate() / stream(), typed in one place for both clients.

`GenerateOptions` is a TypedDict, so `**options: Unpack[GenerateOptions]` shows IDEs and type
checkers every accepted keyword with its type, while the four methods that take them
(Client and AsyncClient, generate and stream) share one definition. At run time
`request_from_options` refuses a keyword it does not know with a TypeError that lists the
accepted ones, instead of one that names an internal function.
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
    request_id: str  # at most 128 printable ASCII characters; the server picks one when empty
    text_output: bool  # False: token ids only (no detokenizing)
    return_routed_experts: bool  # Completion.routed_experts: [rows][MoE layers][k]
    include_prompt: bool  # with return_routed_experts: the prompt's rows too


ACCEPTED = tuple(GenerateOptions.__annotations__)
_ALIASES = {"max_tokens": "max_new_tokens"}


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
    return out


def request_from_options(prompt: str | Sequence[int], options: dict[str, Any]) -> gen_pb.GenerateRequest:
    return convert.build_request(prompt, **normalize(options))
