"""The Starlette application of the HTTP front end: routes and the bearer-token check.

/v1/completions, /v1/chat/completions and /v1/models need the server's token (the same one
as gRPC: server.auth_token) as `Authorization: Bearer ...` when one is set; /health and
/metrics stay open, as gRPC's health service and the metrics endpoint do. /health answers
200 only while the server is SERVING (503 while loading, draining or failed).
"""
from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.rpc.metrics_http import CONTENT_TYPE

from .endpoints import GenerationEndpoint
from .errors import HttpError
from .unsupported import CHAT, COMPLETIONS

if TYPE_CHECKING:
    from server.rpc.service import GenerationService

OPEN_PATHS = ("/health", "/metrics")


class BearerAuth:
    """ASGI middleware: 401 in OpenAI's error shape unless the request carries the token."""

    def __init__(self, app, token: str | None) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if self._expected is not None and scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            sent = dict(scope.get("headers") or ()).get(b"authorization")
            if sent is None or not hmac.compare_digest(sent, self._expected):
                why = "missing bearer token" if sent is None else "invalid bearer token"
                await HttpError(401, f"{why} (Authorization: Bearer <server.auth_token>)",
                                code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(service: "GenerationService", token: str | None) -> BearerAuth:
    async def models(request: Request) -> JSONResponse:
        if service.engine is None:
            return HttpError(503, service.state.unavailable_reason()).response()
        info = service.engine.model_info()
        return JSONResponse({"object": "list", "data": [{
            "id": info.model_name, "object": "model", "created": int(time.time()), "owned_by": "epserve",
            "max_model_len": info.max_model_len}]})

    async def health(request: Request) -> Response:
        if service.state.serving:
            return Response("SERVING\n", media_type="text/plain")
        return Response(f"{service.state.phase.name}: {service.state.unavailable_reason()}\n", status_code=503,
                        media_type="text/plain")

    render = service.metrics.renderer(service.sample_for_metrics)

    async def metrics(request: Request) -> Response:
        return Response(await render(), media_type=CONTENT_TYPE)

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return HttpError(404, f"no route {request.method} {request.url.path}").response()

    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return HttpError(405, f"{request.method} is not allowed on {request.url.path}").response()

    app = Starlette(routes=[
        Route("/v1/completions", GenerationEndpoint(service, COMPLETIONS), methods=["POST"]),
        Route("/v1/chat/completions", GenerationEndpoint(service, CHAT), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: not_allowed})
    return BearerAuth(app, token)
