"""An OpenAI request body -> the gRPC API's GenerateRequest, one per prompt.

Mapping onto GenerateRequest means the HTTP front end takes the same road as gRPC calls from
there on: server/rpc/validation.py checks every value once for both front ends (its field
paths are renamed to this API's names in errors), and the engine sees identical requests,
so greedy outputs match token for token. Only what the gRPC API lacks is checked here: JSON
types, the model name, the ranges of fields that take another shape there (n, logprobs,
max_tokens 0 with echo), and fields the engine cannot serve yet (unsupported.py).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable

from clients.pb import generation_pb2 as gen_pb
from server.engine.api import MAX_N, MAX_TOP_LOGPROBS

from .choices import ChoiceLayout, fan_out
from .errors import HttpError, bad_request
from .fields import Fields, is_token_id
from .unsupported import CHAT, COMPLETIONS, refuse_unsupported

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_PROMPTS = 64  # a list of prompts in one /v1/completions body


@dataclass(frozen=True)
class HttpGeneration:
    """What one HTTP request asks for: the engine's GenerateRequests and how to answer."""

    endpoint: str  # COMPLETIONS or CHAT
    request_id: str  # the response's id; requests run as request_id, or f"{request_id}-{i}" when several
    requests: tuple[gen_pb.GenerateRequest, ...]  # chat requests get their token ids from the template
    layout: ChoiceLayout  # which request (and sequence of it) each choice is
    messages: tuple[dict[str, Any], ...] = ()  # chat only
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    logprobs: bool = False  # the sampled token's log-probability
    top_logprobs: int = 0  # and the N most likely tokens at each position
    echo: bool = False  # completions: the prompt's text before the completion (and its logprobs, with logprobs)
    echo_only: bool = False  # completions: max_tokens 0 with echo, the prompt alone (its logprobs scored)
    routed_experts: bool = False  # epserve extension: return_routed_experts
    token_ids: bool = False  # extension (vLLM's name): return_token_ids, each choice's (or chunk's) token ids
    chat_max_tokens_set: bool = True


def param_names(endpoint: str) -> dict[str, str]:
    """gRPC field paths (validation.py's error fields) -> this API's parameter names."""
    prompt = "messages" if endpoint == CHAT else "prompt"
    top = "top_logprobs" if endpoint == CHAT else "logprobs"
    return {"max_new_tokens": "max_tokens", "sampling.temperature": "temperature", "sampling.top_p": "top_p",
            "top_logprobs": top, "n": "n",
            "sampling.top_k": "top_k", "sampling.seed": "seed", "prompt": prompt, "prompt.text": prompt,
            "prompt.token_ids": prompt, "prompt.token_ids.ids": prompt, "sampling.min_p": "min_p",
            "sampling.repetition_penalty": "repetition_penalty", "sampling.presence_penalty": "presence_penalty",
            "sampling.frequency_penalty": "frequency_penalty", "min_tokens": "min_tokens"}


def parse_request(body: dict[str, Any], endpoint: str, served_model: str, active_routing: str) -> HttpGeneration:
    fields = Fields(body)
    model = fields.str("model")
    if model is not None and model != served_model:
        raise HttpError(404, f"model {model!r} is not served here; this server serves {served_model!r}",
                        param="model", code="model_not_found")
    _check_routing(fields, active_routing)
    refuse_unsupported(fields, endpoint)
    stream = bool(fields.bool("stream"))
    options = fields.dict("stream_options") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("stream_options.include_usage", "must be true or false")
    echo = endpoint == COMPLETIONS and bool(fields.bool("echo"))
    base, echo_only = _base_request(fields, endpoint, echo)
    n = _n(fields)
    request_id = ("chatcmpl-" if endpoint == CHAT else "cmpl-") + uuid.uuid4().hex
    token_ids = bool(fields.bool("return_token_ids"))
    if endpoint == CHAT:
        messages = _messages(fields)
        base.request_id = request_id
        requests, layout = fan_out([base], n, False)
        return HttpGeneration(CHAT, request_id, requests, layout, messages, stream, include_usage, base.logprobs,
                              base.top_logprobs, routed_experts=base.return_routed_experts, token_ids=token_ids,
                              chat_max_tokens_set=base.HasField("max_new_tokens"))
    base.prompt_logprobs = echo and base.logprobs  # echo with logprobs scores the prompt too
    prompts = _prompts(fields.get("prompt"))
    requests = []
    for i, prompt in enumerate(prompts):
        req = gen_pb.GenerateRequest()
        req.CopyFrom(base)
        req.request_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
            req.token_ids.SetInParent()
        requests.append(req)
    engine_requests, layout = fan_out(requests, n, base.prompt_logprobs)
    return HttpGeneration(COMPLETIONS, request_id, engine_requests, layout, (), stream, include_usage, base.logprobs,
                          base.top_logprobs, echo, echo_only, base.return_routed_experts, token_ids)


def _n(fields: Fields) -> int:
    n = fields.int("n")
    if n is not None and not 1 <= n <= MAX_N:
        raise bad_request("n", f"must be in [1, {MAX_N}], got {n}")
    return 1 if n is None else n


def _logprobs(fields: Fields, endpoint: str) -> tuple[bool, int]:
    """(the sampled token's logprob, top N). Completions: `logprobs: N` asks both (0: the sampled
    token's alone); chat: `logprobs: true` and `top_logprobs: N`, which needs logprobs."""
    if endpoint == CHAT:
        wanted, top, param = bool(fields.bool("logprobs")), fields.int("top_logprobs"), "top_logprobs"
        if top is not None and top > 0 and not wanted:
            raise bad_request("top_logprobs", "needs logprobs: true")
    else:
        top, param = fields.int("logprobs"), "logprobs"
        wanted = top is not None
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(param, f"must be in [0, {MAX_TOP_LOGPROBS}] (the server's cap on alternatives per "
                                 f"token), got {top}")
    return wanted, top or 0


def _check_routing(fields: Fields, active: str) -> None:
    """`routing` is a read-only echo: a request may name the policy it expects, never switch it."""
    value = fields.get("routing")
    if value is None:
        return
    name = value.get("name") if isinstance(value, dict) else value
    if not isinstance(name, str):
        raise bad_request("routing", 'must be a policy name or {"name": ...}')
    if name != active:
        raise HttpError(400, f"routing: the server runs {active!r}, not {name!r}; this field is read-only "
                             "(switch policies with the gRPC SetRoutingPolicy call)", param="routing")


def _set(param: str, assign: Callable[[], None]) -> None:
    try:
        assign()
    except (ValueError, TypeError) as exc:  # out of protobuf's range, e.g. a negative seed
        raise bad_request(param, f"out of range ({exc})") from None


def _base_request(fields: Fields, endpoint: str, echo: bool) -> tuple[gen_pb.GenerateRequest, bool]:
    """The fields every choice shares -> (request, echo_only). max_tokens 0 is allowed with echo
    (lm-eval's and vLLM's way to score a prompt): the engine generates one token, left out."""
    req, echo_only = gen_pb.GenerateRequest(), False
    if endpoint == CHAT:
        newer, older = fields.int("max_completion_tokens"), fields.int("max_tokens")
        max_tokens, param = (newer, "max_completion_tokens") if newer is not None else (older, "max_tokens")
    else:
        max_tokens, param = fields.int("max_tokens"), "max_tokens"
        if max_tokens is None:
            max_tokens = DEFAULT_COMPLETION_TOKENS
    if max_tokens == 0 and echo:
        max_tokens, echo_only = 1, True
    if max_tokens is not None:
        if max_tokens < 1:
            raise bad_request(param, f"must be at least 1 (0 only with echo), got {max_tokens}")
        _set(param, lambda: setattr(req, "max_new_tokens", max_tokens))
    temperature = fields.number("temperature")
    _set("temperature", lambda: setattr(req.sampling, "temperature", 1.0 if temperature is None else temperature))
    top_p = fields.number("top_p")
    if top_p is not None:
        _set("top_p", lambda: setattr(req.sampling, "top_p", top_p))
    top_k = fields.int("top_k")
    if top_k is not None and top_k != -1:  # -1: no cut, as vLLM spells it
        _set("top_k", lambda: setattr(req.sampling, "top_k", top_k))
    for name in ("min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):  # validation.py checks ranges
        value = fields.number(name)
        if value is not None:
            _set(name, lambda: setattr(req.sampling, name, value))
    min_tokens = fields.int("min_tokens")
    if min_tokens is not None:
        _set("min_tokens", lambda: setattr(req, "min_tokens", min_tokens))
    seed = fields.int("seed")
    if seed is not None:
        _set("seed", lambda: setattr(req.sampling, "seed", seed))
    req.stop.extend(fields.strings("stop"))
    _set("stop_token_ids", lambda: req.stop_token_ids.extend(fields.ints("stop_token_ids")))
    req.ignore_eos = bool(fields.bool("ignore_eos"))
    req.logprobs, req.top_logprobs = _logprobs(fields, endpoint)
    req.return_routed_experts = bool(fields.bool("return_routed_experts"))
    return req, echo_only


def _prompts(value: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms: a string, token ids, a list of strings, a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(is_token_id(v) for v in value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        prompts: list = value
    elif isinstance(value, list) and value and all(isinstance(v, list) and all(is_token_id(t) for t in v)
                                                    for v in value):
        prompts = value
    else:
        raise bad_request("prompt", "must be a string, a list of token ids, a list of strings or a list of "
                                    "token-id lists (non-empty)")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(prompts)}")
    return prompts


def _messages(fields: Fields) -> tuple[dict[str, Any], ...]:
    """Chat messages as the template expects them: role and text content (parts joined)."""
    value = fields.get("messages")
    if not isinstance(value, list) or not value:
        raise bad_request("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise bad_request(f"messages[{i}]", "must be an object with a string role")
        content = msg.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad_request(f"messages[{i}].content", "only text parts ({type: text, text}) are supported")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append({"role": msg["role"], "content": content})
    return tuple(out)
