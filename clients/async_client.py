"""asyncio client with the same methods as Client (all awaitable; stream() is async)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable, Unpack, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import convert
from .options import GenerateOptions, request_from_options
from .channel import DEFAULT_TARGET, ConnectionSettings
from .errors import EpserveError, UnavailableError, from_rpc_error
from .pb import abort_pb2
from .pb import generation_pb2 as gen_pb
from .pb import info_pb2 as info_pb
from .pb import routing_pb2 as routing_pb
from .pb.service_pb2_grpc import GenerationServiceStub
from .retry import Deadline, RetryPolicy, is_retryable
from .stream_state import StreamState
from .sync_client import SERVICE_NAME
from .types import Chunk, Completion, ExpertLoad, ModelInfo, RoutingPolicyInfo, ServerInfo

_DEFAULT = object()


class AsyncGenerationStream:
    """Async iterator of Chunk and async context manager; `await stream.aclose()` (or leaving
    `async with`) cancels the call, which frees the sequence on the server at once."""

    def __init__(self, start: Callable[[float | None], Any], deadline: Deadline, retry: RetryPolicy,
                 state: StreamState) -> None:
        self._start, self._deadline, self._retry = start, deadline, retry
        self._state = state
        self._call: Any = start(deadline.remaining())  # sent now: the server admits it at once
        self._received = False
        self._closed = False

    def __aiter__(self) -> "AsyncGenerationStream":
        return self

    async def __anext__(self) -> Chunk:
        if self._closed:
            raise StopAsyncIteration
        try:
            msg = await (self._call.read() if self._received else self._first())
        except grpc.RpcError as exc:
            self._closed = True
            raise from_rpc_error(exc) from None
        if msg is grpc.aio.EOF:
            self._closed = True
            self._state.check_finished()
            raise StopAsyncIteration
        self._received = True
        return self._state.add(msg)

    async def _first(self) -> gen_pb.GenerateResponse:
        """Read the first message; on UNAVAILABLE start the call again (nothing was generated)."""
        delays = self._retry.delays()
        while True:
            try:
                return await self._call.read()
            except grpc.RpcError as exc:
                delay = next(delays, None)
                if not is_retryable(exc) or delay is None or not self._deadline.allows_sleep(delay):
                    raise
                await asyncio.sleep(delay)
                self._call = self._start(self._deadline.remaining())

    @property
    def completion(self) -> Completion:
        return self._state.completion()

    async def aclose(self) -> None:
        if not self._closed:
            self._call.cancel()
        self._closed = True

    def __del__(self) -> None:  # a stream dropped unfinished must not keep generating
        if not getattr(self, "_closed", True):
            self._call.cancel()

    async def __aenter__(self) -> "AsyncGenerationStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient:
    """asyncio epserve client. The channel is opened on first use, inside the running loop."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, server_hostname: str | None = None,
                 timeout: float | None = 120.0, retry: RetryPolicy = RetryPolicy(),
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.settings = ConnectionSettings.make(target, token, tls, root_certificates, server_hostname, max_message_bytes)
        self.timeout, self.retry = timeout, retry
        self._channel: grpc.aio.Channel | None = None
        self._stub: GenerationServiceStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None

    def _stubs(self) -> tuple[GenerationServiceStub, health_pb2_grpc.HealthStub]:
        if self._channel is None:
            self._channel = self.settings.aio_channel()
            self._stub = GenerationServiceStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)
        return self._stub, self._health  # type: ignore[return-value]

    async def generate(self, prompt: str | Sequence[int], *, timeout: Any = _DEFAULT, **options: Unpack[GenerateOptions]) -> Completion:
        request = request_from_options(prompt, options)
        reply = await self._unary(lambda: self._stubs()[0].Generate, request, timeout)
        state = StreamState.of(request)
        state.add_reply(reply)
        state.check_finished()
        return state.completion()

    def stream(self, prompt: str | Sequence[int], *, timeout: Any = _DEFAULT, **options: Unpack[GenerateOptions]) -> AsyncGenerationStream:
        request = request_from_options(prompt, options)
        metadata = self.settings.metadata()
        return AsyncGenerationStream(lambda t: self._stubs()[0].GenerateStream(request, timeout=t, metadata=metadata),
                                     Deadline(self._timeout(timeout)), self.retry, StreamState.of(request))

    async def abort(self, request_id: str, *, timeout: Any = _DEFAULT) -> int:
        """End the generation call with this request id (any connection's; chunks carry it) at
        once: its stream ends with finish_reason CANCELLED. Returns how many calls ended;
        NotFoundError when none with that id is in progress."""
        reply = await self._unary(lambda: self._stubs()[0].Abort, abort_pb2.AbortRequest(request_id=request_id), timeout)
        return reply.aborted

    async def info(self, *, timeout: Any = _DEFAULT) -> ModelInfo:
        reply = await self._unary(lambda: self._stubs()[0].GetModelInfo, info_pb.GetModelInfoRequest(), timeout)
        return convert.model_info_from_pb(reply)

    async def expert_load(self, reset: bool = False, *, timeout: Any = _DEFAULT) -> ExpertLoad:
        reply = await self._unary(lambda: self._stubs()[0].GetExpertLoad, info_pb.GetExpertLoadRequest(reset=reset), timeout)
        return convert.expert_load_from_pb(reply)

    async def routing_policy(self, *, timeout: Any = _DEFAULT) -> RoutingPolicyInfo:
        reply = await self._unary(lambda: self._stubs()[0].GetRoutingPolicy, routing_pb.GetRoutingPolicyRequest(), timeout)
        return convert.routing_policy_from_pb(reply)

    async def set_routing_policy(self, name: str, *, timeout: Any = _DEFAULT, **params: Any) -> RoutingPolicyInfo:
        reply = await self._unary(lambda: self._stubs()[0].SetRoutingPolicy, convert.set_routing_request(name, params),
                                  timeout)
        return convert.routing_policy_from_pb(reply)

    async def server_info(self, *, timeout: Any = _DEFAULT) -> ServerInfo:
        reply = await self._unary(lambda: self._stubs()[0].GetServerInfo, info_pb.GetServerInfoRequest(), timeout)
        return convert.server_info_from_pb(reply)

    async def health(self, service: str = SERVICE_NAME, *, timeout: float | None = 5.0) -> str:
        try:
            reply = await self._stubs()[1].Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                                 metadata=self.settings.metadata())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def wait_ready(self, timeout: float = 60.0, poll_s: float = 0.1) -> None:
        end = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < end:
            try:
                last = await self.health(timeout=max(min(end - time.monotonic(), 5.0), 0.01))
                if last == "SERVING":
                    return
            except EpserveError as exc:
                last = str(exc)
            await asyncio.sleep(poll_s)
        raise UnavailableError(f"server at {self.settings.target} not SERVING after {timeout:.1f}s (last: {last})")

    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is _DEFAULT else timeout

    async def _unary(self, method: Callable[[], Any], request: Any, timeout: Any) -> Any:
        deadline, delays = Deadline(self._timeout(timeout)), self.retry.delays()
        while True:
            try:
                return await method()(request, timeout=deadline.remaining(), metadata=self.settings.metadata())
            except grpc.RpcError as exc:
                delay = next(delays, None)
                if not is_retryable(exc) or delay is None or not deadline.allows_sleep(delay):
                    raise from_rpc_error(exc) from None
                await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
