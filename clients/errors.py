"""One exception class per class of gRPC status, so callers never touch grpc.RpcError."""
from __future__ import annotations

import grpc


class EpserveError(Exception):
    """Base class. `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `details` the
    server's message."""

    code: str = "UNKNOWN"

    def __init__(self, details: str, code: str | None = None) -> None:
        super().__init__(f"{code or self.code}: {details}")
        self.details = details
        if code:
            self.code = code


class InvalidRequestError(EpserveError):
    """INVALID_ARGUMENT / OUT_OF_RANGE / FAILED_PRECONDITION: fix the request, do not retry."""

    code = "INVALID_ARGUMENT"


class ResourceExhaustedError(EpserveError):
    """RESOURCE_EXHAUSTED: queue, KV cache or concurrent-call limit, or message too large."""

    code = "RESOURCE_EXHAUSTED"


class UnavailableError(EpserveError):
    """UNAVAILABLE: server loading, draining, unreachable, or its engine failed (retried)."""

    code = "UNAVAILABLE"


class DeadlineExceededError(EpserveError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout passed."""

    code = "DEADLINE_EXCEEDED"


class CancelledError(EpserveError):
    """CANCELLED: the call was cancelled (by the server while draining, or by this client)."""

    code = "CANCELLED"


class AuthenticationError(EpserveError):
    """UNAUTHENTICATED / PERMISSION_DENIED: missing or wrong bearer token."""

    code = "UNAUTHENTICATED"


class NotFoundError(EpserveError):
    """NOT_FOUND: e.g. Abort named a request id that no call in progress has."""

    code = "NOT_FOUND"


class ServerError(EpserveError):
    """INTERNAL / UNKNOWN / DATA_LOSS / UNIMPLEMENTED / ...: a server-side bug (logged there)."""

    code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[EpserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
}


def from_rpc_error(exc: grpc.RpcError) -> EpserveError:
    """grpc.RpcError (sync or aio) -> the matching EpserveError."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    cls = _BY_CODE.get(code, ServerError)
    return cls(details, code=code.name if code is not None else None)
