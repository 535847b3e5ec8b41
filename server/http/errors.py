"""HTTP errors in the OpenAI API's shape: `{"error": {"message", "type", "param", "code"}}`.

Every refusal of the HTTP front end goes through `HttpError`, so a client built for OpenAI's
API (the `openai` package raises BadRequestError, NotFoundError, ... from the status and
reads `message`) sees what it expects. The engine's typed errors map to one status each.
"""
from __future__ import annotations

from starlette.responses import JSONResponse

from server.engine.api import EngineUnavailableError, InvalidRequestError, ResourceExhaustedError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable"}


class HttpError(Exception):
    """A refusal with its HTTP status; `param` names the request field at fault, if one is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(param: str, rule: str) -> HttpError:
    return HttpError(400, f"{param}: {rule}", param=param)


def from_engine_error(exc: Exception, param_names: dict[str, str]) -> HttpError:
    """The engine's (or the shared validation's) typed error -> HttpError. `param_names` maps
    gRPC request field paths to this API's names (max_new_tokens -> max_tokens)."""
    if isinstance(exc, InvalidRequestError):
        head, dot, rest = exc.field.partition("[")
        param = param_names.get(head, head) + (dot + rest if dot else "")
        return HttpError(400, f"{param}: {exc.message}", param=param)
    if isinstance(exc, ResourceExhaustedError):
        return HttpError(429, str(exc) or "the engine's queue or KV cache is full; retry later")
    if isinstance(exc, EngineUnavailableError):
        return HttpError(503, str(exc) or "the engine is unavailable")
    raise TypeError(f"not an engine error: {exc!r}")
