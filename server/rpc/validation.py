"""Check every GenerateRequest field and build the engine's GenerationRequest.

This is where requests are validated, once: the engine only asserts its own invariants
(server/frontend/request_checks.py), which everything accepted here meets. Each rule raises
InvalidRequestError(field, rule) with the proto field path, so the caller gets INVALID_ARGUMENT
with a message like "sampling.top_p: must be in (0, 1], got 1.5". Defaults for unset fields live here and in the
.proto comments, nowhere else.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Callable

from clients.pb import generation_pb2 as gen_pb
from server.engine.api import (MAX_N, MAX_TOP_LOGPROBS, GenerationRequest, InvalidRequestError, RoutedExpertsMode,
                               SamplingParams, StopParams)

from .received import ReceivedRequest

DEFAULT_MAX_NEW_TOKENS = 16
_OUTPUT_FORMATS = {v.number: v.name for v in gen_pb.OutputFormat.DESCRIPTOR.values}


@dataclass(frozen=True)
class RequestLimits:
    """What the served model and the server accept."""

    vocab_size: int
    max_model_len: int
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_stop_token_ids: int = 64
    max_request_id_chars: int = 128
    max_prompt_bytes: int = 1 << 20  # text prompts longer than this are refused before tokenizing
    max_top_logprobs: int = MAX_TOP_LOGPROBS
    max_n: int = MAX_N
    max_abs_penalty: float = 2.0  # presence / frequency penalties (OpenAI's range)


@dataclass(frozen=True)
class ValidRequest:
    engine_request: GenerationRequest
    text_output: bool  # fill `text` in responses (OUTPUT_FORMAT_TOKEN_IDS leaves it empty)


def _check(cond: bool, field: str, rule: str) -> None:
    if not cond:
        raise InvalidRequestError(field, rule)


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _check_vocab(ids: tuple[int, ...], field: str, vocab_size: int) -> None:
    """uint32 ids (never negative) below vocab_size; one C-level max(), the index only on failure."""
    if ids and max(ids) >= vocab_size:
        i, tok = next((i, t) for i, t in enumerate(ids) if t >= vocab_size)
        raise InvalidRequestError(f"{field}[{i}]", f"{tok} is out of vocabulary (vocab_size {vocab_size})")


def validate_request(received: ReceivedRequest, limits: RequestLimits,
                     encode: Callable[[str], list[int]]) -> ValidRequest:
    """ReceivedRequest -> ValidRequest, or InvalidRequestError naming the first bad field."""
    if received.decode_error:
        raise InvalidRequestError("request", received.decode_error.removeprefix("request: "))
    req = received.message
    _check(len(received.prompt_kinds) <= 1, "prompt",
           f"set exactly one of text or token_ids, got both ({' and '.join(received.prompt_kinds)})")

    request_id = req.request_id
    _check(len(request_id) <= limits.max_request_id_chars, "request_id",
           f"at most {limits.max_request_id_chars} characters, got {len(request_id)}")
    _check(all(32 <= ord(c) < 127 for c in request_id), "request_id", "printable ASCII characters only")

    _check(req.output_format in _OUTPUT_FORMATS, "output_format",
           f"unknown value {req.output_format}; expected one of {sorted(_OUTPUT_FORMATS.values())}")
    text_output = req.output_format != gen_pb.OUTPUT_FORMAT_TOKEN_IDS

    _check(req.return_routed_experts or not req.include_prompt, "include_prompt",
           "adds prompt rows to the routed experts: set return_routed_experts too")
    routed = (RoutedExpertsMode.NONE if not req.return_routed_experts else
              RoutedExpertsMode.WITH_PROMPT if req.include_prompt else RoutedExpertsMode.GENERATED)
    sampling = _sampling(req, limits)
    stops = _stops(req, limits)
    _check(req.top_logprobs <= limits.max_top_logprobs, "top_logprobs",
           f"must be in [0, {limits.max_top_logprobs}], got {req.top_logprobs}")
    n = req.n if req.HasField("n") and req.n else 1
    _check(n <= limits.max_n, "n", f"must be in [1, {limits.max_n}] (unset: 1), got {n}")
    prompt_ids = _prompt(req, limits, encode)  # last: tokenizing costs more than the cheap checks
    return ValidRequest(
        GenerationRequest(
            request_id=request_id or uuid.uuid4().hex,
            prompt_token_ids=prompt_ids,
            sampling=sampling,
            stops=stops,
            logprobs=req.logprobs or req.top_logprobs > 0,
            top_logprobs=req.top_logprobs,
            prompt_logprobs=req.prompt_logprobs,
            n=n,
            routed_experts=routed,
        ),
        text_output,
    )


def _prompt(req: gen_pb.GenerateRequest, limits: RequestLimits, encode: Callable[[str], list[int]]) -> tuple[int, ...]:
    kind = req.WhichOneof("prompt")
    _check(kind is not None, "prompt", "set exactly one of text or token_ids, got neither")
    if kind == "text":
        _check(len(req.text) > 0, "prompt.text", "must not be empty")
        size = len(req.text) if len(req.text) * 4 <= limits.max_prompt_bytes else len(req.text.encode("utf-8"))
        _check(size <= limits.max_prompt_bytes, "prompt.text",
               f"{size} bytes of UTF-8; at most {limits.max_prompt_bytes} (server.max_prompt_bytes) are tokenized")
        ids = tuple(encode(req.text))
        _check(len(ids) > 0, "prompt.text", "tokenizes to no tokens")
        bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
        _check(bad is None, "prompt.text", f"the tokenizer produced id {bad}, outside the model's vocabulary "
                                           f"(vocab_size {limits.vocab_size}): tokenizer and model do not match")
        where = "prompt.text"
    else:
        ids = tuple(req.token_ids.ids)
        _check(len(ids) > 0, "prompt.token_ids.ids", "must hold at least one token id")
        _check_vocab(ids, "prompt.token_ids.ids", limits.vocab_size)
        where = "prompt.token_ids"
    limit = limits.max_model_len - 1
    _check(len(ids) <= limit, where,
           f"prompt is {len(ids)} tokens; the limit is {limit} (max_model_len {limits.max_model_len} "
           f"minus one token to generate)")
    return ids


def _sampling(req: gen_pb.GenerateRequest, limits: RequestLimits) -> SamplingParams:
    s = req.sampling
    _check(_finite(s.temperature) and s.temperature >= 0, "sampling.temperature",
           f"must be a finite number >= 0 (0 means greedy), got {s.temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    _check(_finite(top_p) and 0 < top_p <= 1, "sampling.top_p",
           f"must be in (0, 1] (leave it unset for 1.0), got {top_p}")
    _check(s.top_k >= 0, "sampling.top_k", f"must be >= 0 (0 means no top-k cut), got {s.top_k}")
    top_k = 0 if s.top_k >= limits.vocab_size else s.top_k  # k >= vocab keeps every token: no cut
    seed = s.seed if s.HasField("seed") else None
    _check(_finite(s.min_p) and 0 <= s.min_p <= 1, "sampling.min_p", f"must be in [0, 1] (0: no cut), got {s.min_p}")
    repetition = s.repetition_penalty if s.HasField("repetition_penalty") else 1.0
    _check(_finite(repetition) and repetition > 0, "sampling.repetition_penalty",
           f"must be a finite number > 0 (leave it unset for 1.0, no penalty), got {repetition}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        _check(_finite(value) and abs(value) <= limits.max_abs_penalty, f"sampling.{name}",
               f"must be in [-{limits.max_abs_penalty:g}, {limits.max_abs_penalty:g}] (0: off), got {value}")
    return SamplingParams(temperature=float(s.temperature), top_p=float(top_p), top_k=top_k, seed=seed,
                          min_p=float(s.min_p), repetition_penalty=float(repetition),
                          presence_penalty=float(s.presence_penalty), frequency_penalty=float(s.frequency_penalty))


def _stops(req: gen_pb.GenerateRequest, limits: RequestLimits) -> StopParams:
    if req.HasField("max_new_tokens"):
        n = req.max_new_tokens
        _check(1 <= n <= limits.max_model_len, "max_new_tokens",
               f"must be in [1, {limits.max_model_len}] (max_model_len), got {n}")
    else:
        n = DEFAULT_MAX_NEW_TOKENS
    _check(len(req.stop) <= limits.max_stop_strings, "stop",
           f"at most {limits.max_stop_strings} stop strings, got {len(req.stop)}")
    for i, s in enumerate(req.stop):
        size = len(s.encode("utf-8"))
        _check(0 < size <= limits.max_stop_string_bytes, f"stop[{i}]",
               f"must be 1..{limits.max_stop_string_bytes} bytes of UTF-8, got {size}")
    _check(len(req.stop_token_ids) <= limits.max_stop_token_ids, "stop_token_ids",
           f"at most {limits.max_stop_token_ids} ids, got {len(req.stop_token_ids)}")
    _check_vocab(tuple(req.stop_token_ids), "stop_token_ids", limits.vocab_size)
    _check(req.min_tokens <= n, "min_tokens", f"must be at most max_new_tokens ({n}), got {req.min_tokens}")
    return StopParams(max_new_tokens=n, stop=tuple(req.stop), stop_token_ids=tuple(req.stop_token_ids),
                      ignore_eos=req.ignore_eos, min_tokens=req.min_tokens)
