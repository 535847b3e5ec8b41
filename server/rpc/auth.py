"""Bearer-token check for every call except health (load balancers probe without secrets).

The token comes from server.auth_token or the environment variable named by
server.auth_token_env; without one, auth is off. Comparison is constant-time.

Every call other than health, to a method that exists or not, is answered only after the
token check: without the right token an unknown method is UNAUTHENTICATED like any other (so
method names cannot be probed), with it UNIMPLEMENTED. The check runs inside the call's
handler, where the peer is known (an interceptor does not see it), so failed attempts are
budgeted per client address (auth_limiter.py); the handler has no request deserializer, and
the request is parsed only once the caller is authenticated.
"""
from __future__ import annotations

import hmac
import inspect
import os
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from server.config import ConfigError, ServerConfig

from .auth_limiter import FailedAuthLimiter, peer_address

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
MISSING = "missing bearer token: send metadata 'authorization: Bearer <token>'"
INVALID = "invalid bearer token"


def resolve_token(cfg: ServerConfig) -> str | None:
    """The configured token, or None when auth is off (ConfigError if the env var is unset)."""
    if cfg.auth_token:
        return cfg.auth_token
    if cfg.auth_token_env:
        value = os.environ.get(cfg.auth_token_env)
        if not value:
            raise ConfigError(f"server.auth_token_env={cfg.auth_token_env!r} names an environment variable "
                              "that is unset or empty; set it or drop the option")
        return value
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, limiter: FailedAuthLimiter | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self.limiter = limiter or FailedAuthLimiter()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method.startswith(OPEN_PREFIXES):
            return handler
        refusal = self._refusal(dict(details.invocation_metadata or ()).get("authorization"))
        return _guarded(handler, refusal, self.limiter)

    def _refusal(self, sent: str | bytes | None) -> str | None:
        """Why the token does not authenticate the call, or None when it does."""
        if sent is None:
            return MISSING
        sent_bytes = sent.encode() if isinstance(sent, str) else sent
        return None if hmac.compare_digest(sent_bytes, self._expected) else INVALID


def _guarded(handler: grpc.RpcMethodHandler | None, refusal: str | None,
             limiter: FailedAuthLimiter) -> grpc.RpcMethodHandler:
    """`handler` behind the token check (None: an unknown method, UNIMPLEMENTED once authenticated)."""

    async def admit(context: grpc.aio.ServicerContext) -> None:
        address = peer_address(context.peer())
        wait = limiter.wait_s(address)
        if wait:  # judged before the token, so a right guess does not show either
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"too many failed token attempts from {address}; this call's token was not "
                                f"checked; retry in {wait:.1f}s")
        if refusal is not None:
            limiter.failed(address)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        if handler is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

    if handler is None:
        async def unknown(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await admit(context)
            yield  # pragma: no cover  (admit always aborts; this makes an async generator)

        return grpc.stream_stream_rpc_method_handler(unknown)

    parse = handler.request_deserializer or (lambda raw: raw)
    kw = dict(request_deserializer=None, response_serializer=handler.response_serializer)  # nothing parsed before admit
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary
        unary_request = handler.unary_unary is not None

        async def respond(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            return await inner(parse(request) if unary_request else _parsed(request, parse), context)

        make = grpc.unary_unary_rpc_method_handler if unary_request else grpc.stream_unary_rpc_method_handler
        return make(respond, **kw)
    inner = handler.unary_stream or handler.stream_stream
    unary_request = handler.unary_stream is not None
    make = grpc.unary_stream_rpc_method_handler if unary_request else grpc.stream_stream_rpc_method_handler
    if inspect.isasyncgenfunction(inner):  # replies yielded (bound methods count too)
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await admit(context)
            async for reply in inner(parse(request) if unary_request else _parsed(request, parse), context):
                yield reply

        return make(stream, **kw)

    async def write(request: Any, context: grpc.aio.ServicerContext) -> None:  # replies go out by context.write
        await admit(context)
        await inner(parse(request) if unary_request else _parsed(request, parse), context)

    return make(write, **kw)


async def _parsed(requests: AsyncIterator[bytes], parse: Callable[[bytes], Any]) -> AsyncIterator[Any]:
    async for raw in requests:
        yield parse(raw)
