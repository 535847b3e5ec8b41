"""The wire between the front end and the engine-core process: ZeroMQ sockets, msgpack frames.

Two PUSH/PULL pipes over ipc:// sockets in a private (0700) temporary folder, both bound by the
front end: `inputs` (front end -> core) and `outputs` (core -> front end). Nothing listens on a
network interface. Every frame is one msgpack array whose first item says what it is:

  front end -> core
    [BATCH, adds, aborts, loads, switches]
                                    everything the front end queued during one event-loop turn:
                                    adds = [[req_id, prompt ids, temperature, top_p, top_k, seed,
                                    max_new_tokens, stop token ids, ignore_eos, logprobs,
                                    routed experts (0 no, 1 yes, 2 with the prompt)], ...],
                                    aborts = [req_id, ...], loads = [[call_id, reset], ...],
                                    switches = [[call_id, routing.* mapping], ...]
    [SHUTDOWN]                      drain is over: stop the ranks and exit 0
  core -> front end
    [READY, model_info, routing]    the core is up (model_info and the RoutingPolicyState
                                    pickled: frozen dataclasses)
    [START_FAILED, kind, message]   kind: "config" (exit 2), "start" (exit 2) or "error"
    [STEP, req_ids, token_ids, logprobs, finished, stats, load, routed]
                                    ONE frame per engine step for every request at once;
                                    finished = [[req_id, reason], ...]; stats = EngineStats fields;
                                    load = [call_ids, pickled ExpertLoadSnapshot] or None;
                                    routed = per request the uint16 bytes of its routed experts
                                    (None where not asked for), or None when nobody asked
    [ROUTING, call_ids, ok, reply]  answer to switches: ok -> pickled RoutingPolicyState (every
                                    rank runs it), else the reason it was refused
    [STATS, stats]                  after inputs changed the queue while no step ran
    [REJECTED, req_id, kind, message]  an add the core refused (kind "exhausted" or "invalid")
    [FAILED, reason]                the core is dead (a rank died, a step failed); it exits 1
    [HEARTBEAT]                     the core process runs: its watcher thread sends one every
                                    HEARTBEAT_S, whatever the step loop does, so the front end
                                    sees a stopped process by the silence (core_liveness.py)

Pickle only travels for rare replies between our own two processes, on sockets only this user
can reach.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from dataclasses import astuple
from typing import Any

import msgpack

from .api import EngineStats, FinishReason, RoutedExpertsMode, SamplingParams, StopParams
from .core_types import EngineRequest, StepOutputs

BATCH, SHUTDOWN = 1, 2
READY, START_FAILED, STEP, STATS, REJECTED, FAILED, ROUTING, HEARTBEAT = 10, 11, 12, 13, 14, 15, 16, 17
HEARTBEAT_S = 0.5  # how often the core says it runs

_REASON_BY_VALUE = {r.value: r for r in FinishReason}


def pack(frame: list | tuple) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)


def unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False)


# ---- requests ---------------------------------------------------------------------------------
def request_fields(req: EngineRequest) -> list:
    sp, st = req.sampling, req.stops
    return [req.req_id, list(req.prompt_token_ids), sp.temperature, sp.top_p, sp.top_k, sp.seed, st.max_new_tokens,
            list(st.stop_token_ids), st.ignore_eos, req.logprobs, int(req.routed_experts)]


def request_from_fields(f: list) -> EngineRequest:
    req_id, prompt, temperature, top_p, top_k, seed, max_new, stop_ids, ignore_eos, logprobs, routed = f
    return EngineRequest(req_id, tuple(prompt), SamplingParams(temperature, top_p, top_k, seed),
                         StopParams(max_new_tokens=max_new, stop_token_ids=tuple(stop_ids), ignore_eos=ignore_eos),
                         logprobs, RoutedExpertsMode(routed))


# ---- step outputs -------------------------------------------------------------------------------
def step_frame(out: StepOutputs, stats: EngineStats, load_calls: list[int] | None) -> bytes:
    load = [load_calls, pickle.dumps(out.expert_load)] if load_calls else None
    finished = [[req_id, reason.value] for req_id, reason in out.finished.items()]
    return pack([STEP, out.req_ids, out.token_ids, out.logprobs, finished, list(astuple(stats)), load, out.routed])


def finish_reasons(finished: list) -> dict[int, FinishReason]:
    return {req_id: _REASON_BY_VALUE[value] for req_id, value in finished}


def stats_from_fields(fields: list) -> EngineStats:
    return EngineStats(*fields)


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


# ---- where the sockets live ------------------------------------------------------------------------
class SocketDir:
    """A private folder holding the two ipc:// socket files; removed on close."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="epserve-")  # mode 0700
        os.chmod(self.path, 0o700)
        self.inputs = f"ipc://{self.path}/in"
        self.outputs = f"ipc://{self.path}/out"

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
