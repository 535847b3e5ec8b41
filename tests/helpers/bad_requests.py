"""A table of bad GenerateRequests (wire bytes), each with the status and the field name the
server must answer with. Used by the validation unit test and against the real server."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from clients.pb import generation_pb2 as g


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class BadRequest:
    name: str
    build: Callable[[Limits], bytes]
    field: str  # must appear in the status details
    code: str = "INVALID_ARGUMENT"


def good(**fields) -> g.GenerateRequest:
    """A valid request (3 prompt ids, 4 new tokens, greedy) with `fields` overriding it."""
    req = g.GenerateRequest(token_ids=g.TokenIds(ids=[1, 2, 3]), max_new_tokens=4)
    for key, value in fields.items():
        if key == "sampling":
            req.sampling.CopyFrom(g.SamplingParams(**value))
        elif key == "token_ids":
            req.token_ids.CopyFrom(value)
        elif isinstance(value, (list, tuple)):
            getattr(req, key).extend(value)
        else:
            setattr(req, key, value)
    return req


def _b(fn: Callable[[Limits], g.GenerateRequest]) -> Callable[[Limits], bytes]:
    return lambda lim: fn(lim).SerializeToString()


def _no_prompt(lim: Limits) -> bytes:
    req = good()
    req.ClearField("token_ids")
    return req.SerializeToString()


def _both_prompts(lim: Limits) -> bytes:
    # Concatenated messages merge on the wire: both oneof members are present.
    return g.GenerateRequest(text="hello").SerializeToString() + good().SerializeToString()


BAD_REQUESTS: list[BadRequest] = [
    BadRequest("neither prompt kind", _no_prompt, "prompt"),
    BadRequest("both prompt kinds", _both_prompts, "prompt"),
    BadRequest("empty text", _b(lambda l: good(text="")), "prompt.text"),
    BadRequest("empty token ids", _b(lambda l: good(token_ids=g.TokenIds())), "prompt.token_ids.ids"),
    BadRequest("out-of-vocab id", _b(lambda l: good(token_ids=g.TokenIds(ids=[1, l.vocab_size]))), "prompt.token_ids.ids[1]"),
    BadRequest("huge token id", _b(lambda l: good(token_ids=g.TokenIds(ids=[2**32 - 1]))), "prompt.token_ids.ids[0]"),
    BadRequest("ids over max_model_len", _b(lambda l: good(token_ids=g.TokenIds(ids=[1] * l.max_model_len))), "prompt.token_ids"),
    BadRequest("text over max_model_len", _b(lambda l: good(text=" hello" * l.max_model_len)), "prompt.text"),
    BadRequest("max_new_tokens 0", _b(lambda l: good(max_new_tokens=0)), "max_new_tokens"),
    BadRequest("max_new_tokens over max_model_len", _b(lambda l: good(max_new_tokens=l.max_model_len + 1)), "max_new_tokens"),
    BadRequest("max_new_tokens 2^32-1", _b(lambda l: good(max_new_tokens=2**32 - 1)), "max_new_tokens"),
    BadRequest("negative temperature", _b(lambda l: good(sampling=dict(temperature=-0.5))), "sampling.temperature"),
    BadRequest("NaN temperature", _b(lambda l: good(sampling=dict(temperature=float("nan")))), "sampling.temperature"),
    BadRequest("infinite temperature", _b(lambda l: good(sampling=dict(temperature=float("inf")))), "sampling.temperature"),
    BadRequest("top_p 0", _b(lambda l: good(sampling=dict(top_p=0.0))), "sampling.top_p"),
    BadRequest("top_p above 1", _b(lambda l: good(sampling=dict(top_p=1.5))), "sampling.top_p"),
    BadRequest("negative top_p", _b(lambda l: good(sampling=dict(top_p=-0.1))), "sampling.top_p"),
    BadRequest("NaN top_p", _b(lambda l: good(sampling=dict(top_p=float("nan")))), "sampling.top_p"),
    BadRequest("negative top_k", _b(lambda l: good(sampling=dict(top_k=-1))), "sampling.top_k"),
    BadRequest("negative min_p", _b(lambda l: good(sampling=dict(temperature=1.0, min_p=-0.1))), "sampling.min_p"),
    BadRequest("min_p above 1", _b(lambda l: good(sampling=dict(temperature=1.0, min_p=1.5))), "sampling.min_p"),
    BadRequest("NaN min_p", _b(lambda l: good(sampling=dict(min_p=float("nan")))), "sampling.min_p"),
    BadRequest("repetition_penalty 0", _b(lambda l: good(sampling=dict(repetition_penalty=0.0))), "sampling.repetition_penalty"),
    BadRequest("negative repetition_penalty", _b(lambda l: good(sampling=dict(repetition_penalty=-1.2))),
               "sampling.repetition_penalty"),
    BadRequest("infinite repetition_penalty", _b(lambda l: good(sampling=dict(repetition_penalty=float("inf")))),
               "sampling.repetition_penalty"),
    BadRequest("presence_penalty above 2", _b(lambda l: good(sampling=dict(presence_penalty=2.5))), "sampling.presence_penalty"),
    BadRequest("NaN frequency_penalty", _b(lambda l: good(sampling=dict(frequency_penalty=float("nan")))),
               "sampling.frequency_penalty"),
    BadRequest("frequency_penalty below -2", _b(lambda l: good(sampling=dict(frequency_penalty=-3.0))),
               "sampling.frequency_penalty"),
    BadRequest("min_tokens over max_new_tokens", _b(lambda l: good(max_new_tokens=4, min_tokens=5)), "min_tokens"),
    BadRequest("top_logprobs over 20", _b(lambda l: good(logprobs=True, top_logprobs=21)), "top_logprobs"),
    BadRequest("n over 16", _b(lambda l: good(n=17)), "n"),
    BadRequest("too many stop strings", _b(lambda l: good(stop=[f"s{i}" for i in range(17)])), "stop"),
    BadRequest("stop string too long", _b(lambda l: good(stop=["ok", "x" * 257])), "stop[1]"),
    BadRequest("empty stop string", _b(lambda l: good(stop=[""])), "stop[0]"),
    BadRequest("too many stop token ids", _b(lambda l: good(stop_token_ids=[1] * 65)), "stop_token_ids"),
    BadRequest("out-of-vocab stop token id", _b(lambda l: good(stop_token_ids=[1, l.vocab_size + 5])), "stop_token_ids[1]"),
    BadRequest("unknown output_format", _b(lambda l: good(output_format=7)), "output_format"),
    BadRequest("request_id too long", _b(lambda l: good(request_id="r" * 129)), "request_id"),
    BadRequest("request_id with a newline", _b(lambda l: good(request_id="a\nb")), "request_id"),
    BadRequest("not a protobuf message", lambda l: b"\xff\xff\xff\xff", "request"),
]
