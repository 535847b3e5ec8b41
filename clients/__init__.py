"""Python client for the epserve gRPC API (blocking `Client` and asyncio `AsyncClient`).

    from clients import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("Hello", max_new_tokens=16).text)
        with c.stream("Hello", max_new_tokens=16) as s:
            for chunk in s:
                print(chunk.text, end="")

Results are plain dataclasses (clients.types) and errors are EpserveError subclasses
(clients.errors); protobuf types stay inside the package (clients.pb holds the stubs).
"""
from .async_client import AsyncClient, AsyncGenerationStream
from .errors import (
    AuthenticationError, CancelledError, DeadlineExceededError, EpserveError, InvalidRequestError,
    NotFoundError, ResourceExhaustedError, ServerError, UnavailableError,
)
from .options import GenerateOptions
from .retry import NO_RETRY, RetryPolicy
from .sync_client import Client, GenerationStream
from .types import (
    Chunk, Completion, ExpertLoad, FinishReason, LayerExpertLoad, ModelInfo, RoutingPolicyInfo, ServerInfo,
    ServerStats, ServingState, Usage,
)

__all__ = [
    "AsyncClient", "AsyncGenerationStream", "AuthenticationError", "CancelledError", "Chunk", "Client",
    "Completion", "DeadlineExceededError", "EpserveError", "ExpertLoad", "FinishReason", "GenerateOptions", "GenerationStream",
    "InvalidRequestError", "LayerExpertLoad", "ModelInfo", "NO_RETRY", "NotFoundError", "ResourceExhaustedError", "RetryPolicy",
    "RoutingPolicyInfo", "ServerError", "ServerInfo", "ServerStats", "ServingState", "UnavailableError", "Usage",
]
