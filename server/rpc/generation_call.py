"""One Generate / GenerateStream call, from admission to its last message.

Shared by the unary and streaming methods: `emit` either writes each message to the stream
or collects them into one reply. Every way a call can end is mapped to one status code and
counted once: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, CANCELLED,
DEADLINE_EXCEEDED, INTERNAL (logged with the request's context) or OK.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Awaitable, Callable

import grpc

from clients.pb import generation_pb2 as gen_pb
from server.engine.api import (
    EngineUnavailableError, FinishReason, GenerationChunk, GenerationRequest, InvalidRequestError,
    ResourceExhaustedError,
)

from .metrics import observe_many
from .received import ReceivedRequest
from .reply_size import ReplyTooLarge, split_to_fit
from .to_proto import FINISH_REASONS, usage_to_pb
from .validation import validate_request

if TYPE_CHECKING:
    from .service import GenerationService

log = logging.getLogger(__name__)
Emit = Callable[[gen_pb.GenerateResponse], Awaitable[None]]


class CallAborted(Exception):
    """Ends a call with a status code; raised inside, turned into context.abort at the edge."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class ClientGone(Exception):
    """A write to the client failed: its connection is gone (it was killed, or reset the stream)."""


class GenerationFailed(Exception):
    """The engine reported FinishReason.ERROR for this request."""


async def run_generation(service: "GenerationService", received: ReceivedRequest, context: grpc.aio.ServicerContext,
                         method: str, emit: Emit) -> None:
    """Admit, validate, generate and emit; abort the call with the right status on failure."""
    arrival = time.perf_counter()
    task = asyncio.current_task()
    code, details = grpc.StatusCode.OK, ""
    request_id = received.message.request_id or "-"
    admitted = False
    peer = context.peer()
    try:
        try:
            if not service.state.serving:
                raise CallAborted(grpc.StatusCode.UNAVAILABLE, service.state.unavailable_reason())
            if service.calls.full() and not service.calls.make_room(asyncio.get_running_loop().time()):
                raise CallAborted(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"too many concurrent generation calls (server.max_concurrent_streams="
                                  f"{service.calls.limit}); retry later")
            if service.calls.peer_full(peer):
                raise CallAborted(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"too many concurrent generation calls on this connection "
                                  f"(server.max_calls_per_connection={service.calls.per_connection}); retry later")
            service.calls.add(task, peer)
            admitted = True
            service.metrics.active_calls.inc()
            valid = await _validate(service, received)
            request = valid.engine_request
            request_id = request.request_id
            service.calls.name(task, request_id)
            service.metrics.prompt_tokens.inc(len(request.prompt_token_ids))
            progress = _Progress(len(request.prompt_token_ids))
            try:
                await _stream_chunks(service, request, valid.text_output, arrival, emit, progress)
            except asyncio.CancelledError:
                if task not in service.calls.aborted:
                    raise
                task.uncancel()  # ended by Abort(request_id): a normal end, finish reason CANCELLED
                await emit(progress.final_message(request_id, time.perf_counter() - arrival))
        except CallAborted as exc:
            code, details = exc.code, exc.details
        except ReplyTooLarge as exc:  # what the client would have seen from grpc, without the traceback
            code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except InvalidRequestError as exc:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except ResourceExhaustedError as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            details = str(exc) or "the engine's queue or KV cache is full; retry later"
        except EngineUnavailableError as exc:
            code, details = grpc.StatusCode.UNAVAILABLE, str(exc) or "the engine is unavailable"
            service.engine_unavailable(exc)
        except asyncio.CancelledError:
            if task in service.calls.cut:
                code, details = grpc.StatusCode.UNAVAILABLE, service.calls.cut[task]
            elif task in service.calls.stalled:  # a write is still pending: abort would wait on it
                code = grpc.StatusCode.CANCELLED
                raise
            else:
                remaining = context.time_remaining()
                code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                        else grpc.StatusCode.CANCELLED)
                raise
        except ClientGone:  # counted as a cancellation; there is nobody to send a status to
            code = grpc.StatusCode.CANCELLED
            return
        except GenerationFailed as exc:
            code = grpc.StatusCode.INTERNAL
            log.error("%s request %s: %s", method, request_id, exc)
            details = f"generation failed for request {request_id}; see the server log"
        except Exception:
            if _client_gone(context):  # a write to a client that vanished: a cancellation, not a bug
                code = grpc.StatusCode.CANCELLED
                return
            code = grpc.StatusCode.INTERNAL
            log.exception("%s request %s from %s failed unexpectedly (prompt kind %s)", method, request_id,
                          peer, received.message.WhichOneof("prompt"))
            details = f"internal error while serving request {request_id}; see the server log"
        if code is not grpc.StatusCode.OK:
            try:
                await context.abort(code, details)
            except grpc.aio.AbortError:
                raise
            except Exception:  # the call already ended on the client's side: nobody to tell
                if not _client_gone(context):
                    raise
                code = grpc.StatusCode.CANCELLED
    finally:
        if admitted:
            service.calls.remove(task)
            service.metrics.active_calls.dec()
        service.metrics.requests.labels(method, code.name).inc()
        service.metrics.duration.labels(method).observe(time.perf_counter() - arrival)


def _client_gone(context: grpc.aio.ServicerContext) -> bool:
    try:
        return context.cancelled() or context.done()
    except Exception:  # noqa: BLE001 - a context too broken to ask is a call that is over
        return True


async def _validate(service: "GenerationService", received: ReceivedRequest):
    """Checks, and tokenizing a text prompt in the server's tokenizer thread: a long prompt
    costs that thread, never the event loop (health checks and other streams keep going)."""
    if received.message.WhichOneof("prompt") != "text" or received.decode_error:
        return validate_request(received, service.limits, service.engine.encode)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(service.tokenizer_thread, validate_request, received, service.limits,
                                      service.engine.encode)


class _Progress:
    """What a call has sent so far: the usage its last message reports if Abort ends it."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens, self.completion_tokens, self.first_token_s = prompt_tokens, 0, 0.0

    def final_message(self, request_id: str, elapsed: float) -> gen_pb.GenerateResponse:
        return gen_pb.GenerateResponse(
            finish_reason=gen_pb.FINISH_REASON_CANCELLED, request_id=request_id,
            usage=gen_pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                               time_to_first_token_s=self.first_token_s, total_time_s=elapsed))


async def _stream_chunks(service: "GenerationService", request: GenerationRequest, text_output: bool, arrival: float,
                         emit: Emit, progress: _Progress) -> None:
    metrics = service.metrics
    info = service.engine.model_info()
    routed_shape = (info.num_moe_layers, info.top_k)  # RoutedExperts.num_layers, top_k
    last_token_at: float | None = None
    left = request.n  # sequences still running (each ends with its own finish reason)
    async with aclosing(service.engine.generate(request)) as chunks:
        async for chunk in chunks:
            now = time.perf_counter()
            n = len(chunk.token_ids)
            if n:
                if last_token_at is None:
                    metrics.ttft.observe(now - arrival)
                    progress.first_token_s = now - arrival
                    observe_many(metrics.itl, 0.0, n - 1)
                else:
                    observe_many(metrics.itl, (now - last_token_at) / n, n)
                last_token_at = now
                metrics.generation_tokens.inc(n)
            if chunk.finish_reason is FinishReason.ERROR:
                done = chunk.usage.completion_tokens if chunk.usage else "?"
                raise GenerationFailed(f"the engine reported an error after {done} generated tokens")
            msg = _to_message(chunk, request.request_id, text_output, now - arrival, routed_shape)
            if chunk.finish_reason is not None:
                await emit(msg)
                left -= 1
                if not left:
                    return
                continue
            if n or msg.text:
                await emit(msg)
                progress.completion_tokens += n
    raise RuntimeError("the engine's stream ended without a final chunk")


def stream_writer(service: "GenerationService", context: grpc.aio.ServicerContext) -> Emit:
    """`context.write` of each message, split to fit server.max_message_bytes (reply_size.py),
    with the time each write began kept while it is pending (a write that never completes
    means the client stopped reading: ActiveCalls.watch_stalls)."""
    writing, task = service.calls.writing, asyncio.current_task()
    loop = asyncio.get_running_loop()
    limit = service.app.server.max_message_bytes

    async def write(msg: gen_pb.GenerateResponse) -> None:
        for part in split_to_fit(msg, limit):
            writing[task] = loop.time()
            try:
                await context.write(part)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # grpc reports a dead transport as a failed batch, before the
                raise ClientGone(repr(exc)) from exc  # call is marked cancelled or done
            finally:
                writing.pop(task, None)

    return write


def _to_message(chunk: GenerationChunk, request_id: str, text_output: bool, elapsed: float,
                routed_shape: tuple[int, int]) -> gen_pb.GenerateResponse:
    msg = gen_pb.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text if text_output else "", index=chunk.index,
                                  request_id=request_id)  # on every message: a caller can Abort it
    if chunk.logprobs is not None:
        msg.logprobs.extend(chunk.logprobs)
    if chunk.top_logprobs is not None:
        for position in chunk.top_logprobs:
            msg.top_logprobs.add(token_ids=[t for t, _ in position], logprobs=[lp for _, lp in position])
    if chunk.prompt_logprobs is not None:
        msg.prompt_logprobs.extend(chunk.prompt_logprobs)
    if chunk.prompt_top_logprobs is not None:
        for position in chunk.prompt_top_logprobs:
            msg.prompt_top_logprobs.add(token_ids=[t for t, _ in position], logprobs=[lp for _, lp in position])
    if chunk.routed_experts is not None:
        r = msg.routed_experts
        r.num_layers, r.top_k, r.ids = routed_shape[0], routed_shape[1], chunk.routed_experts
    if chunk.finish_reason is not None:
        msg.finish_reason = FINISH_REASONS[chunk.finish_reason]
        if chunk.usage is not None:
            msg.usage.CopyFrom(usage_to_pb(chunk.usage, elapsed))
    return msg
