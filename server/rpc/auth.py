"""Bearer-token check for every call except health (load balancers probe without secrets).

The token comes from server.auth_token or the environment variable named by
server.auth_token_env; without one, auth is off. Comparison is constant-time.
"""
from __future__ import annotations

import hmac
import os
from typing import Any, Awaitable, Callable

import grpc

from server.config import ConfigError, ServerConfig

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


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


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails the call with UNAUTHENTICATED."""
    async def abort_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator)

    # No request deserializer: an unauthenticated call is refused before a byte of it is parsed.
    kw = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort_unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kw)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization")
        if sent is None:
            return _deny(handler, "missing bearer token: send metadata 'authorization: Bearer <token>'")
        sent_bytes = sent.encode() if isinstance(sent, str) else sent
        if not hmac.compare_digest(sent_bytes, self._expected):
            return _deny(handler, "invalid bearer token")
        return handler
