"""The /v1/completions and /v1/chat/completions endpoints, as plain ASGI apps.

Plain ASGI rather than a framework response class: one task runs a call from its body to its
last byte, so that task is what ActiveCalls tracks, what Abort and a shutdown cancel, and
what a client that hangs up cancels (ClientWatch), which closes the engine stream and frees
the sequence at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from server.engine.api import (
    EngineUnavailableError, FinishReason, InvalidRequestError, ResourceExhaustedError,
)
from server.rpc.received import ReceivedRequest
from server.rpc.validation import validate_request

from .body import read_json_object
from .chat_template import chat_prompt_ids
from .errors import HttpError, from_engine_error
from .generation import Admission, Tally, chunks_of
from .request_map import HttpGeneration, param_names, parse_request
from .responses import FINISH_REASONS, SSE_DONE, ChoiceOutput, ResponseFormat, json_bytes, sse
from .unsupported import CHAT

if TYPE_CHECKING:
    from server.rpc.service import GenerationService

log = logging.getLogger(__name__)
STATUS_NAMES = {200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND",
                413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED",
                499: "CANCELLED", 500: "INTERNAL", 503: "UNAVAILABLE"}
_ENGINE_ERRORS = (InvalidRequestError, ResourceExhaustedError, EngineUnavailableError)


class ClientWatch:
    """Cancels the call's task when its client hangs up (uvicorn reports it to `receive`)."""

    def __init__(self, receive, send, writing: dict) -> None:
        self.task, self.gone, self.finished = asyncio.current_task(), False, False
        self._send, self._writing = send, writing
        self._watch = asyncio.ensure_future(self._run(receive))

    async def send(self, message: dict) -> None:
        """`send`, noting the last body message first: after it uvicorn's `receive` answers
        http.disconnect for a call that ended well, which is no hang-up. While a send waits
        (the client stopped reading), ActiveCalls.writing has its start, so the stall
        watchdog (server.stalled_stream_timeout_s) frees the slot as it does for gRPC."""
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        self._writing[self.task] = asyncio.get_running_loop().time()
        try:
            await self._send(message)
        finally:
            self._writing.pop(self.task, None)

    async def _run(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    self.gone = True
                    self.task.cancel()
                return

    def stop(self) -> None:
        self.finished = True
        self._watch.cancel()


class GenerationEndpoint:
    def __init__(self, service: "GenerationService", endpoint: str) -> None:
        self.service, self.endpoint = service, endpoint
        self.method = f"http/{endpoint}"

    async def __call__(self, scope, receive, send) -> None:
        arrival, status = time.perf_counter(), 500
        service = self.service
        try:
            body = await read_json_object(scope, receive, service.app.server.max_message_bytes)
            if service.engine is None or not service.state.serving:
                raise HttpError(503, service.state.unavailable_reason())
            info = service.engine.model_info()
            policy = service.engine.routing_policy()
            gen = parse_request(body, self.endpoint, info.model_name, policy.name)
            client = scope.get("client") or ("?", 0)
            async with Admission(service, f"http:{client[0]}:{client[1]}", gen.request_id) as admission:
                requests = await self._validate(gen, info.max_model_len)
                service.metrics.prompt_tokens.inc(sum(len(r.prompt_token_ids) for r in requests))
                prompt_ids = [requests[r].prompt_token_ids for r in gen.layout.request_of]
                texts = [self._prompt_text(gen, r, requests) for r in gen.layout.request_of]
                fmt = ResponseFormat(gen, info.model_name, {"name": policy.name, "params": dict(policy.params)},
                                     (info.num_moe_layers, info.top_k), lambda t: service.engine.decode([t]),
                                     prompt_ids, texts)
                watch = ClientWatch(receive, send, service.calls.writing)
                try:
                    status = await self._serve(gen, requests, fmt, admission, arrival, watch.send)
                except asyncio.CancelledError:
                    if not (watch.gone or admission.task in service.calls.stalled):
                        raise
                    asyncio.current_task().uncancel()
                    status = 499  # the client hung up or stopped reading: nobody to answer
                finally:
                    watch.stop()
        except HttpError as exc:
            status = exc.status
            await exc.response()(scope, receive, send)
        except ConnectionResetError:
            status = 499
        finally:
            service.metrics.requests.labels(self.method, STATUS_NAMES.get(status, str(status))).inc()
            service.metrics.duration.labels(self.method).observe(time.perf_counter() - arrival)

    async def _validate(self, gen: HttpGeneration, max_model_len: int):
        """Template and tokenize in the server's tokenizer thread (never on the event loop), then
        the gRPC front end's own checks, with errors named in this API's terms."""
        service = self.service

        def work():
            out = []
            for msg in gen.requests:
                if gen.endpoint == CHAT:
                    ids = chat_prompt_ids(getattr(service.engine, "tokenizer", None), gen.messages)
                    msg.token_ids.ids.extend(ids)
                    if not gen.chat_max_tokens_set:  # as many as the context holds
                        msg.max_new_tokens = max(1, max_model_len - len(ids))
                out.append(validate_request(ReceivedRequest(msg, (msg.WhichOneof("prompt"),)), service.limits,
                                            service.engine.encode).engine_request)
            return out

        try:
            return await asyncio.get_running_loop().run_in_executor(service.tokenizer_thread, work)
        except InvalidRequestError as exc:
            raise from_engine_error(exc, param_names(gen.endpoint)) from None

    def _prompt_text(self, gen: HttpGeneration, r: int, requests) -> str:
        """Request r's prompt as echo shows it: as sent, or decoded when sent as token ids."""
        if not gen.echo:
            return ""
        sent = gen.requests[r]
        return sent.text if sent.HasField("text") else self.service.engine.decode(list(requests[r].prompt_token_ids))

    async def _serve(self, gen: HttpGeneration, requests, fmt: ResponseFormat, admission: Admission,
                     arrival: float, send) -> int:
        layout = gen.layout
        tallies = [Tally(len(fmt.prompt_ids[c]) if layout.counts_prompt(c) else 0) for c in range(layout.total)]
        chunks = chunks_of(self.service, requests, arrival, tallies, layout)
        if gen.stream:
            return await _stream(gen, chunks, fmt, tallies, admission, send)
        outputs = [ChoiceOutput() for _ in range(layout.total)]
        try:
            async for i, chunk in chunks:
                _check_error(chunk, gen.request_id)
                outputs[i].add(_shown(chunk, gen))
        except _ENGINE_ERRORS as exc:
            raise from_engine_error(exc, param_names(gen.endpoint)) from None
        except asyncio.CancelledError:
            ended = admission.ended()
            if ended is None:
                raise
            asyncio.current_task().uncancel()  # answer with what was generated, finish "abort"
        finally:
            await chunks.aclose()
        await _send_json(send, 200, fmt.whole(outputs, tallies))
        return 200


def _shown(chunk, gen: HttpGeneration):
    """The chunk as the answer shows it: with max_tokens 0 and echo, the one token the engine
    had to generate is left out (its prompt logprobs stay)."""
    if not gen.echo_only:
        return chunk
    return replace(chunk, token_ids=(), text="", logprobs=None, top_logprobs=None)


def _check_error(chunk, request_id: str) -> None:
    if chunk.finish_reason is FinishReason.ERROR:
        log.error("request %s: the engine reported an error", request_id)
        raise HttpError(500, f"generation failed for request {request_id}; see the server log")


async def _stream(gen: HttpGeneration, chunks, fmt: ResponseFormat, tallies: list[Tally], admission: Admission,
                  send) -> int:
    """Server-sent events: the first chunk is awaited before the headers go out, so a refusal
    by the engine (queue full, unavailable) is still an HTTP status, not an event."""
    started, first = False, [True] * len(tallies)

    async def start() -> None:
        nonlocal started
        started = True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})

    async def event(obj: Any) -> None:
        await send({"type": "http.response.body", "body": sse(obj) if obj is not SSE_DONE else SSE_DONE,
                    "more_body": True})

    try:
        async for i, chunk in chunks:
            _check_error(chunk, gen.request_id)
            if not started:
                await start()
            chunk = _shown(chunk, gen)
            finish = FINISH_REASONS.get(chunk.finish_reason) if chunk.finish_reason is not None else None
            if chunk.token_ids or chunk.text or finish is not None or first[i]:
                await event(fmt.chunk(i, chunk, finish, first[i]))
                first[i] = False
    except (HttpError, *_ENGINE_ERRORS) as exc:
        err = exc if isinstance(exc, HttpError) else from_engine_error(exc, param_names(gen.endpoint))
        if not started:
            raise err from None
        await event(err.body())  # headers are gone: the error travels as an event, then the stream ends
    except asyncio.CancelledError:
        ended = admission.ended()
        if ended is None:
            raise
        asyncio.current_task().uncancel()
        if not started:
            await start()
        for i, tally in enumerate(tallies):
            if tally.finish is None:
                await event(fmt.chunk(i, None, ended.reason, first[i]))
    finally:
        await chunks.aclose()
    if not started:
        await start()
    if gen.include_usage:
        await event(fmt.usage_chunk(tallies))
    await send({"type": "http.response.body", "body": SSE_DONE, "more_body": False})
    return 200


async def _send_json(send, status: int, obj: Any) -> None:
    body = json_bytes(obj)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
