"""The typed messages between the front end and the engine core, and their one codec.

Two PUSH/PULL pipes, both bound by the front end (frontend/pipes.py): `inputs` (front end -> core)
and `outputs` (core -> front end). Every frame is one message below, encoded by `encode` and
read back by `decode`: msgpack, each message an extension type whose code names its class
and whose payload is its fields in order (nested messages the same way). A field holds only
what msgpack holds: ints, floats, strings, bytes, lists, dicts, None, or another message.

  front end -> core
    InputFrame    everything the front end queued during one event-loop turn (numbered 0, 1, ...)
    Shutdown      the drain is over: stop the ranks and end
  core -> front end
    Ready         the core is up: its ModelInfo and RoutingPolicyState
    StartFailed   kind "config" (exit 2), "start" (exit 2) or "error"
    StepFrame     ONE per engine step, for every request at once
    Stats         after the core applied input frame `confirmed`: its queue now
    RoutingReply  answer to policy switches
    Rejected      an add the core refused ("exhausted" or "invalid")
    Failed        the core is dead (a rank died, a step failed)
    Heartbeat     the core runs: its watcher sends one every HEARTBEAT_S whatever the step loop
                  does, so the front end sees a stopped process by the silence (frontend/liveness.py)

ModelInfo and RoutingPolicyState travel pickled inside Ready and RoutingReply (frozen
dataclasses with tuples and mappings msgpack would turn into lists): rare replies between our
own two processes, on sockets only this user can reach.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

from ..moe.load_stats import ExpertLoadSnapshot
from ..engine.api import EngineStats, FinishReason, RoutedExpertsMode, SamplingParams, StopParams
from .step_io import EngineRequest, StepOutputs

HEARTBEAT_S = 0.5  # how often the core says it runs


# ---- front end -> core ------------------------------------------------------------------------------
@dataclass
class AddRequest:
    req_id: int
    prompt: list[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    max_new_tokens: int
    stop_token_ids: list[int]
    ignore_eos: bool
    logprobs: bool
    routed_experts: int  # RoutedExpertsMode
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    prefix_of: int = -1

    @classmethod
    def of(cls, req: EngineRequest) -> "AddRequest":
        sp, st = req.sampling, req.stops
        return cls(req.req_id, list(req.prompt_token_ids), sp.temperature, sp.top_p, sp.top_k, sp.seed,
                   st.max_new_tokens, list(st.stop_token_ids), st.ignore_eos, req.logprobs, int(req.routed_experts),
                   sp.min_p, sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty, st.min_tokens,
                   req.top_logprobs, req.prompt_logprobs, req.prefix_of)

    def request(self) -> EngineRequest:
        sampling = SamplingParams(self.temperature, self.top_p, self.top_k, self.seed, min_p=self.min_p,
                                  repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                                  frequency_penalty=self.frequency_penalty)
        return EngineRequest(self.req_id, tuple(self.prompt), sampling,
                             StopParams(max_new_tokens=self.max_new_tokens, stop_token_ids=tuple(self.stop_token_ids),
                                        ignore_eos=self.ignore_eos, min_tokens=self.min_tokens),
                             self.logprobs, RoutedExpertsMode(self.routed_experts), self.top_logprobs,
                             self.prompt_logprobs, self.prefix_of)


@dataclass
class LoadCall:
    call_id: int
    reset: bool


@dataclass
class SwitchCall:
    call_id: int
    routing: dict  # the routing.* mapping: {"name": ..., **params}


@dataclass
class InputFrame:
    number: int
    adds: list[AddRequest] = field(default_factory=list)
    aborts: list[int] = field(default_factory=list)  # req_ids
    loads: list[LoadCall] = field(default_factory=list)
    switches: list[SwitchCall] = field(default_factory=list)


@dataclass
class Shutdown:
    pass


# ---- core -> front end ------------------------------------------------------------------------------
@dataclass
class Ready:
    model_info: bytes  # pickled ModelInfo
    routing: bytes  # pickled RoutingPolicyState

    @classmethod
    def of(cls, model_info, routing) -> "Ready":
        return cls(pickle.dumps(model_info), pickle.dumps(routing))

    def unpacked(self) -> tuple[Any, Any]:
        return pickle.loads(self.model_info), pickle.loads(self.routing)


@dataclass
class StartFailed:
    kind: str  # "config", "start" or "error"
    message: str


@dataclass
class LoadReply:
    call_ids: list[int]  # the expert-load calls this snapshot answers
    snapshot: ExpertLoadSnapshot


@dataclass
class StepFrame:
    """One engine step for every request at once (step_io.StepOutputs, columns aligned)."""

    req_ids: list[int]
    token_ids: list[list[int]]
    logprobs: list[list[float] | None]
    finished: dict[int, str]  # req_id -> FinishReason value
    stats: EngineStats
    load: LoadReply | None
    routed: list[bytes | None] | None  # per request its routed experts (RoutedExpertsMode), None if nobody asked
    top_logprobs: list[list | None] | None = None  # StepOutputs.top_logprobs
    prompt_logprobs: list[list[float] | None] | None = None  # StepOutputs.prompt_logprobs
    prompt_top_logprobs: list[list | None] | None = None  # StepOutputs.prompt_top_logprobs

    @classmethod
    def of(cls, out: StepOutputs, stats: EngineStats, load_calls: list[int]) -> "StepFrame":
        load = LoadReply(load_calls, out.expert_load) if load_calls else None
        finished = {req_id: reason.value for req_id, reason in out.finished.items()}
        return cls(out.req_ids, out.token_ids, out.logprobs, finished, stats, load, out.routed, out.top_logprobs,
                   out.prompt_logprobs, out.prompt_top_logprobs)

    def finish_reason(self, req_id: int) -> FinishReason | None:
        value = self.finished.get(req_id)
        return None if value is None else _REASON_BY_VALUE[value]


@dataclass
class Stats:
    stats: EngineStats
    confirmed: int  # the input frame just applied


@dataclass
class RoutingReply:
    call_ids: list[int]
    ok: bool
    reply: bytes | str  # ok: pickled RoutingPolicyState every rank runs; else why it was refused


@dataclass
class Rejected:
    req_id: int
    kind: str  # "exhausted" or "invalid"
    message: str


@dataclass
class Failed:
    reason: str


@dataclass
class Heartbeat:
    pass


_REASON_BY_VALUE = {r.value: r for r in FinishReason}

# ---- the codec ---------------------------------------------------------------------------------------
#: extension code -> class; codes are the wire format: append, never renumber
MESSAGE_TYPES: dict[int, type] = {
    1: InputFrame, 2: AddRequest, 3: LoadCall, 4: SwitchCall, 5: Shutdown,
    10: Ready, 11: StartFailed, 12: StepFrame, 13: Stats, 14: RoutingReply, 15: Rejected, 16: Failed,
    17: Heartbeat, 18: LoadReply, 30: EngineStats, 31: ExpertLoadSnapshot,
}
_CODES = {cls: code for code, cls in MESSAGE_TYPES.items()}
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in MESSAGE_TYPES.values()}


def _to_ext(obj: Any) -> msgpack.ExtType:
    cls = type(obj)
    code = _CODES.get(cls)
    if code is None:
        if isinstance(obj, int):  # msgpack hands over the integers it cannot hold
            raise OverflowError(f"the integer {obj} does not fit in 64 bits")
        raise TypeError(f"{cls.__name__} is not a message the engine's pipes carry")
    return msgpack.ExtType(code, msgpack.packb([getattr(obj, name) for name in _FIELDS[cls]], default=_to_ext,
                                               use_bin_type=True))


def _from_ext(code: int, data: bytes) -> Any:
    return MESSAGE_TYPES[code](*msgpack.unpackb(data, ext_hook=_from_ext, raw=False, strict_map_key=False))


def encode(message: Any) -> bytes:
    """Raises OverflowError / TypeError / ValueError for a value msgpack cannot hold."""
    return msgpack.packb(message, default=_to_ext, use_bin_type=True)


def decode(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_from_ext, raw=False, strict_map_key=False)
