"""Blocking client: `Client(...).generate()`, `.stream()`, `.info()`, `.expert_load()`."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Unpack

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
from .types import Chunk, Completion, ExpertLoad, ModelInfo, RoutingPolicyInfo, ServerInfo

_DEFAULT = object()  # "use the client's timeout"
SERVICE_NAME = "epserve.v1.GenerationService"


class GenerationStream:
    """Iterator of Chunk; also a context manager. Closing it (or leaving the `with` block)
    cancels the call on the server, which frees the sequence at once. After the last chunk,
    `completion` holds the joined result."""

    def __init__(self, start: Callable[[float | None], Any], deadline: Deadline, retry: RetryPolicy,
                 state: StreamState) -> None:
        self._start, self._deadline, self._retry = start, deadline, retry
        self._state = state
        self._call: Any = start(deadline.remaining())  # sent now: the server admits it at once
        self._received = False
        self._closed = False

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> Chunk:
        if self._closed:
            raise StopIteration
        try:
            msg = next(self._call) if self._received else self._first()
        except StopIteration:
            self._closed = True
            self._state.check_finished()
            raise
        except grpc.RpcError as exc:
            self._closed = True
            raise from_rpc_error(exc) from None
        self._received = True
        return self._state.add(msg)

    def _first(self) -> gen_pb.GenerateResponse:
        """Read the first message; on UNAVAILABLE start the call again (nothing was generated)."""
        delays = self._retry.delays()
        while True:
            try:
                return next(self._call)
            except grpc.RpcError as exc:
                delay = next(delays, None)
                if not is_retryable(exc) or delay is None or not self._deadline.allows_sleep(delay):
                    raise
                time.sleep(delay)
                self._call = self._start(self._deadline.remaining())

    @property
    def completion(self) -> Completion:
        return self._state.completion()

    def close(self) -> None:
        if not self._closed:
            self._call.cancel()
        self._closed = True

    def __del__(self) -> None:  # a stream dropped unfinished must not keep generating
        if not getattr(self, "_closed", True):
            self._call.cancel()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """Blocking epserve client. `timeout` (seconds, None for none) becomes each call's gRPC
    deadline, shared by its retries; UNAVAILABLE is retried with backoff per `retry`."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, server_hostname: str | None = None,
                 timeout: float | None = 120.0, retry: RetryPolicy = RetryPolicy(),
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.settings = ConnectionSettings.make(target, token, tls, root_certificates, server_hostname, max_message_bytes)
        self.timeout, self.retry = timeout, retry
        self._channel = self.settings.sync_channel()
        self._stub = GenerationServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- generation ---------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], *, timeout: Any = _DEFAULT, **options: Unpack[GenerateOptions]) -> Completion:
        """Generate and return the whole completion. Options: max_new_tokens, temperature,
        top_p, top_k, seed, stop, stop_token_ids, ignore_eos, logprobs, top_logprobs,
        prompt_logprobs, n (Completion.choices), request_id, text_output, return_routed_experts
        (Completion.routed_experts: [rows][MoE layers][k]), include_prompt."""
        request = request_from_options(prompt, options)
        reply = self._unary(self._stub.Generate, request, timeout)
        state = StreamState.of(request)
        state.add_reply(reply)
        state.check_finished()
        return state.completion()

    def stream(self, prompt: str | Sequence[int], *, timeout: Any = _DEFAULT, **options: Unpack[GenerateOptions]) -> GenerationStream:
        """Stream chunks as they are generated (same options as generate())."""
        request = request_from_options(prompt, options)
        metadata = self.settings.metadata()
        return GenerationStream(lambda t: self._stub.GenerateStream(request, timeout=t, metadata=metadata),
                                Deadline(self._timeout(timeout)), self.retry, StreamState.of(request))

    # -- inspection ----------------------------------------------------------------------
    def abort(self, request_id: str, *, timeout: Any = _DEFAULT) -> int:
        """End the generation call with this request id (any connection's; chunks carry it) at
        once: its stream ends with finish_reason CANCELLED. Returns how many calls ended;
        NotFoundError when none with that id is in progress."""
        reply = self._unary(self._stub.Abort, abort_pb2.AbortRequest(request_id=request_id), timeout)
        return reply.aborted

    def info(self, *, timeout: Any = _DEFAULT) -> ModelInfo:
        return convert.model_info_from_pb(self._unary(self._stub.GetModelInfo, info_pb.GetModelInfoRequest(), timeout))

    def expert_load(self, reset: bool = False, *, timeout: Any = _DEFAULT) -> ExpertLoad:
        reply = self._unary(self._stub.GetExpertLoad, info_pb.GetExpertLoadRequest(reset=reset), timeout)
        return convert.expert_load_from_pb(reply)

    def routing_policy(self, *, timeout: Any = _DEFAULT) -> RoutingPolicyInfo:
        """The routing policy every EP rank runs now."""
        reply = self._unary(self._stub.GetRoutingPolicy, routing_pb.GetRoutingPolicyRequest(), timeout)
        return convert.routing_policy_from_pb(reply)

    def set_routing_policy(self, name: str, *, timeout: Any = _DEFAULT, **params: Any) -> RoutingPolicyInfo:
        """Switch every EP rank to policy `name` with `params` between two steps (the server needs
        server.allow_routing_switch=true); the expert-load counters reset. Returns the policy now
        running (canonical name: fake_balance answers greedy_balanced)."""
        reply = self._unary(self._stub.SetRoutingPolicy, convert.set_routing_request(name, params), timeout)
        return convert.routing_policy_from_pb(reply)

    def server_info(self, *, timeout: Any = _DEFAULT) -> ServerInfo:
        return convert.server_info_from_pb(self._unary(self._stub.GetServerInfo, info_pb.GetServerInfoRequest(), timeout))

    def health(self, service: str = SERVICE_NAME, *, timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... as grpc.health.v1 reports it (not retried)."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout,
                                       metadata=self.settings.metadata())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 60.0, poll_s: float = 0.1) -> None:
        """Block until health says SERVING; UnavailableError when `timeout` passes first."""
        end = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < end:
            try:
                last = self.health(timeout=max(min(end - time.monotonic(), 5.0), 0.01))
                if last == "SERVING":
                    return
            except EpserveError as exc:
                last = str(exc)
            time.sleep(poll_s)
        raise UnavailableError(f"server at {self.settings.target} not SERVING after {timeout:.1f}s (last: {last})")

    # -- plumbing ------------------------------------------------------------------------
    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is _DEFAULT else timeout

    def _unary(self, method: Callable[..., Any], request: Any, timeout: Any) -> Any:
        deadline, delays = Deadline(self._timeout(timeout)), self.retry.delays()
        while True:
            try:
                return method(request, timeout=deadline.remaining(), metadata=self.settings.metadata())
            except grpc.RpcError as exc:
                delay = next(delays, None)
                if not is_retryable(exc) or delay is None or not deadline.allows_sleep(delay):
                    raise from_rpc_error(exc) from None
                time.sleep(delay)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
