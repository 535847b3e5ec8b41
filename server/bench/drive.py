"""Drive the engine core in this process: submit a request set, step it to the end, time it.

The same EngineCore the server runs (server/core/engine_core.py): its scheduler plans every step,
every EP rank's model runner executes it, token-level stops end the requests. A run's
phases, as a server's client sees them:

  prefill  from submitting the set until every request has its first token
  decode   from then until the last request has its last token (B x (O-1) tokens)
  e2e      the whole run: B x O generated tokens over submission -> last token

A `StepObserver` sees every step (the probe pass uses it for per-step loads and MoE times).
Routing policies are switched between runs, while no request is in the engine, through
EngineCore.switch_routing_policy: one step plan carries the switch to every rank at once.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from ..engine.api import SamplingParams, StopParams
from ..core.step_io import EngineRequest, StepOutputs
from .request_sets import RequestSet

GREEDY = SamplingParams(temperature=0.0, seed=0)


class StepObserver(Protocol):
    def before_step(self) -> None: ...
    def after_step(self, out: StepOutputs) -> None: ...


@dataclass(frozen=True)
class RunTiming:
    prefill_s: float  # submission -> every request's first token
    decode_s: float  # -> every request's last token

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


class CoreDriver:
    """Runs request sets through one EngineCore (ids never repeat across runs)."""

    def __init__(self, core) -> None:
        self.core = core
        self._ids = itertools.count()

    def run(self, requests: RequestSet, observer: StepObserver | None = None) -> RunTiming:
        core, out_len = self.core, requests.output_len
        stops = StopParams(max_new_tokens=out_len, ignore_eos=True)
        ids = [next(self._ids) for _ in requests.prompts]
        tokens: dict[int, list[int]] = {i: [] for i in ids}
        waiting_first, unfinished = set(ids), set(ids)
        t_first = None
        t0 = time.perf_counter()
        for req_id, prompt in zip(ids, requests.prompts):
            core.add_request(EngineRequest(req_id, prompt, GREEDY, stops))
        while unfinished:
            if observer is not None:
                observer.before_step()
            out = core.step()
            end = time.perf_counter()
            for req_id, new in zip(out.req_ids, out.token_ids):
                if req_id in tokens:
                    tokens[req_id].extend(new)
                    waiting_first.discard(req_id)
            unfinished.difference_update(out.finished)
            if observer is not None:
                observer.after_step(out)
            if t_first is None and not waiting_first:
                t_first = end
        t_end = time.perf_counter()
        short = {i: len(t) for i, t in tokens.items() if len(t) != out_len}
        if short:
            raise RuntimeError(f"{len(short)} requests did not make exactly {out_len} tokens (e.g. {list(short.items())[:3]})")
        return RunTiming(prefill_s=t_first - t0, decode_s=t_end - t_first)

    def switch_policy(self, routing: Mapping[str, Any], max_steps: int = 8) -> str:
        """Every rank switches to `routing` in one step plan, between runs; -> the policy's repr
        (every rank agreed). A mapping the model cannot serve fails here with a ConfigError."""
        if self.core.scheduler.has_work():
            raise RuntimeError("switch policies between runs: the engine still holds requests")
        self.core.switch_routing_policy(routing)
        for _ in range(max_steps):  # an overlapped core reports it a step later
            switched = self.core.step().routing
            if switched is not None:
                return switched
        raise RuntimeError(f"no step reported the switch to {dict(routing)} within {max_steps} steps")
