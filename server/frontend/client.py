"""EngineClient: the Engine every front end uses (gRPC, bench, load tool, tests), over a CoreLoop
in its own process or on a thread (start.py picks; the client cannot tell them apart).

On the event loop that uses it:
  * `generate` validates, queues an add (all adds and aborts of one loop turn go out as one
    frame), and streams the request's chunks; a stream closed early queues its abort and
    returns once the core confirmed it (its KV blocks are free by then);
  * each STEP frame (ONE per engine step, read by the link's reader: core_link.py) turns every
    request's new tokens into chunks (incremental detokenizing, stop strings, which abort the
    request in the core at once), put on the requests' streams;
  * a failed or stopped core ends every open stream and call with EngineUnavailableError.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import time
from dataclasses import replace
from typing import AsyncIterator, Callable

from ..config import AppConfig
from ..moe.load_stats import ExpertLoadSnapshot
from ..engine.api import (
    EngineStats, EngineUnavailableError, GenerationChunk, GenerationRequest, InvalidPolicyError, InvalidRequestError,
    ModelInfo, ResourceExhaustedError, RoutedExpertsMode, RoutingPolicyState,
)
from .core_link import CoreLink
from ..core.step_io import EngineRequest
from .detokenizer import fast_decode
from .input_batch import InputBatch, Unpackable
from ..core.messages import AddRequest, LoadCall, Rejected, RoutingReply, Stats, StepFrame, SwitchCall
from .output import RequestOutput
from .request_checks import check_invariants
from .request_table import LiveRequest, RequestTable
from .stream import RequestStream

log = logging.getLogger(__name__)
CONFIRM_TIMEOUT_S = 5.0  # a closed stream waits at most this long for the core to confirm its abort


def sequence_requests(request: GenerationRequest) -> list[GenerationRequest]:
    """The n sequences of a request: the first as asked; the others without prompt logprobs or
    prompt routed-expert rows (the first one returns those) and, under a seed, with seed + i."""
    if request.n <= 1:
        return [request]
    others = []
    for i in range(1, request.n):
        seed = None if request.sampling.seed is None else (request.sampling.seed + i) % (1 << 64)
        routed = min(request.routed_experts, RoutedExpertsMode.GENERATED)
        others.append(replace(request, sampling=replace(request.sampling, seed=seed), prompt_logprobs=False,
                              routed_experts=RoutedExpertsMode(routed), n=1))
    return [replace(request, n=1), *others]


class EngineClient:
    """Implements server.engine.api.Engine; `host` is the CoreProcess or CoreThread it talks to."""

    def __init__(self, app: AppConfig, host, pipes, tokenizer, info: ModelInfo, routing: RoutingPolicyState) -> None:
        self.host = host
        self.stream_interval = app.server.stream_interval
        self.tokenizer = tokenizer
        self._decode_text = fast_decode(tokenizer)
        self._info, self._routing = info, routing
        self._row_bytes = info.num_moe_layers * info.top_k * 2  # one routed-experts row
        self._stats = EngineStats(0, 0, 0, 0, 0)
        self._table = RequestTable()
        self._ids = itertools.count()
        self._batch = InputBatch()  # what goes to the core at the end of this event-loop turn
        self._frame = 0  # number of the input frame being filled
        self._flush_scheduled = False
        self._link = CoreLink(host, pipes, app.engine.step_timeout_s, self._on_frame,
                              on_failure=lambda reason: self._table.close(EngineUnavailableError(f"engine failed: {reason}")),
                              on_stop=lambda: self._table.close(EngineUnavailableError("engine shut down")))

    # ---- text and info ---------------------------------------------------------------------------
    @property
    def core(self):
        """The EngineCore when it runs on a thread of this process (to look inside), else None."""
        return self.host.core

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids`, special tokens (EOS, padding) left out — as streamed."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._info.vocab_size

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    def model_info(self) -> ModelInfo:
        return self._info

    def routing_policy(self) -> RoutingPolicyState:
        """As of the last switch the core confirmed."""
        return self._routing

    def stats(self) -> EngineStats:
        """As of the core's last step or applied input frame (each carries them)."""
        return self._stats

    # ---- life cycle ----------------------------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        """Why the engine died (None while healthy). A dead engine never recovers."""
        return self._link.failure

    @property
    def is_alive(self) -> bool:
        return self._link.failure is None and not self._link.stopping

    def wait_failed(self, timeout: float | None = None) -> bool:
        """Block until the engine dies (True) or `timeout` passes (False)."""
        return self._link.wait_failed(timeout)

    def add_failure_callback(self, callback: Callable[[str], None]) -> None:
        """`callback(reason)` runs once, when the engine dies."""
        self._link.add_failure_callback(callback)

    def shutdown(self, timeout: float = 30.0) -> None:
        """From any thread: in-flight requests end with EngineUnavailableError, the core stops its
        ranks and ends; a core that has not within `timeout` is stopped forcibly."""
        self._link.shutdown(timeout)

    # ---- requests (event loop) -------------------------------------------------------------------------
    def _attach(self) -> asyncio.AbstractEventLoop:
        loop, new = self._link.attach()
        if new:
            self._flush_scheduled = False
            if self._batch:
                self._schedule_flush()
        return loop

    def _check_alive(self) -> None:
        if self._link.failure is not None:
            raise EngineUnavailableError(f"engine is dead: {self._link.failure}")
        if self._link.stopping:
            raise EngineUnavailableError("engine is shutting down")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """One request's chunks; with n > 1 those of its n sequences, interleaved (chunk.index),
        ending once every sequence has sent its finish reason."""
        check_invariants(request, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        self._attach()
        self._check_alive()
        stream = RequestStream(self.stream_interval)  # one for all n: chunks of one index merge, never two
        lives = {}
        for index, seq_request in enumerate(sequence_requests(request)):
            req_id = next(self._ids)
            lives[req_id] = live = LiveRequest(RequestOutput(seq_request, self._decode_text, routed_row_bytes=self._row_bytes,
                                                             index=index), stream)
            self._table.requests[req_id] = live
            self._batch.adds.append(AddRequest.of(EngineRequest(
                req_id, seq_request.prompt_token_ids, seq_request.sampling, seq_request.stops, seq_request.logprobs,
                seq_request.routed_experts, seq_request.top_logprobs, seq_request.prompt_logprobs,
                prefix_of=next(iter(lives)) if index else -1)))
        self._schedule_flush()
        left = len(lives)
        try:
            while left:
                chunk = await stream.get()
                yield chunk
                if chunk.finish_reason is not None:
                    left -= 1
        finally:
            for req_id, live in lives.items():
                if self._table.requests.pop(req_id, None) is not None and self.is_alive:
                    self._abort(req_id, live)
            for live in lives.values():
                if live.abort_frame is not None:
                    await self._confirmed(live.abort_frame)

    def _abort(self, req_id: int, live: LiveRequest) -> None:
        self._batch.aborts.append(req_id)
        live.abort_frame = self._frame
        self._schedule_flush()

    async def _confirmed(self, frame: int) -> None:
        """Until the core applied input frame `frame` (or nobody is left to say so)."""
        fut = self._table.confirmation(frame)
        if fut is not None and not await self._link.until(fut, CONFIRM_TIMEOUT_S) and self.is_alive:
            log.warning("the engine core did not confirm input frame %d within %.0f s", frame, CONFIRM_TIMEOUT_S)

    async def expert_load(self, reset: bool = False) -> ExpertLoadSnapshot:
        """Expert-load counters summed over EP ranks (every rank joins at the next step)."""
        return await self._call(self._table.loads, lambda call_id: self._batch.loads.append(LoadCall(call_id, bool(reset))))

    async def set_routing_policy(self, routing) -> RoutingPolicyState:
        """Every rank switches between two steps; returns once the core applied it (or raises
        InvalidPolicyError, nothing changed)."""
        return await self._call(self._table.switches, lambda call_id: self._batch.switches.append(SwitchCall(call_id, dict(routing))))

    async def _call(self, waiters: dict[int, asyncio.Future], queue_it: Callable[[int], None]):
        loop = self._attach()
        self._check_alive()
        call_id = next(self._ids)
        waiters[call_id] = fut = loop.create_future()
        queue_it(call_id)
        self._schedule_flush()
        try:
            return await fut
        finally:
            waiters.pop(call_id, None)

    # ---- input frames -------------------------------------------------------------------------------
    def _schedule_flush(self) -> None:
        loop = self._link.loop
        if not self._flush_scheduled and loop is not None and not loop.is_closed():
            self._flush_scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Everything queued during this loop turn, as one frame; an item that cannot be packed
        is refused to its caller, never left queued (input_batch.py)."""
        self._flush_scheduled = False
        if not self._batch or self._link.failure is not None:
            return
        frame, left_out = self._batch.take_frame(self._frame)
        for item in left_out:
            self._refuse(item)
        if frame is not None:
            self._frame += 1
            self._link.send(frame)

    def _refuse(self, item: Unpackable) -> None:
        if item.kind == "switch":
            self._table.settle(self._table.switches, [item.item_id], InvalidPolicyError(f"routing parameters {item.reason}"))
            return
        live = self._table.requests.pop(item.item_id, None)
        if live is not None:
            live.stream.put(InvalidRequestError("request", item.reason))

    # ---- output messages -------------------------------------------------------------------------------
    def _on_frame(self, message) -> None:
        self._handlers[type(message)](self, message)

    def _on_step(self, step: StepFrame) -> None:
        self._stats = step.stats
        now = time.monotonic()
        requests, routed, tops, prompt_lps = self._table.requests, step.routed, step.top_logprobs, step.prompt_logprobs
        prompt_tops = step.prompt_top_logprobs
        for i, req_id in enumerate(step.req_ids):
            live = requests.get(req_id)
            if live is None:  # cancelled meanwhile, or ended by a stop string
                continue
            reason = step.finish_reason(req_id) if step.finished else None
            chunk = live.output.on_tokens(step.token_ids[i], step.logprobs[i], reason, now,
                                          routed[i] if routed is not None else None,
                                          tops[i] if tops is not None else None,
                                          prompt_lps[i] if prompt_lps is not None else None,
                                          prompt_tops[i] if prompt_tops is not None else None)
            live.stream.put(chunk)
            if chunk.finish_reason is not None:
                del requests[req_id]
                if reason is None:  # a stop string: the core still runs it
                    self._abort(req_id, live)
        if step.load is not None:
            self._table.settle(self._table.loads, step.load.call_ids, step.load.snapshot)

    def _on_stats(self, message: Stats) -> None:
        self._stats = message.stats
        self._table.confirm(message.confirmed)

    def _on_routing(self, message: RoutingReply) -> None:
        if message.ok:
            self._routing = pickle.loads(message.reply)
            self._info = replace(self._info, routing_policy=self._routing.name, routing_params=self._routing.params)
        self._table.settle(self._table.switches, message.call_ids,
                           self._routing if message.ok else InvalidPolicyError(message.reply))

    def _on_rejected(self, message: Rejected) -> None:
        live = self._table.requests.pop(message.req_id, None)
        if live is not None:
            live.stream.put(ResourceExhaustedError(message.message) if message.kind == "exhausted"
                            else InvalidRequestError("request", message.message))

    _handlers = {StepFrame: _on_step, Stats: _on_stats, RoutingReply: _on_routing, Rejected: _on_rejected}
