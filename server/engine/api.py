"""The engine's public surface, as seen by the gRPC layer (rank 0 only).

Plain frozen dataclasses, no protobuf: the gRPC service converts to and from these, and the
Python client mirrors them. Errors are typed so the service can map each class to one gRPC
status code.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Mapping, Protocol

if TYPE_CHECKING:  # annotations only: the engine API does not import the MoE layer at run time
    from ..moe.load_stats import ExpertLoadSnapshot


class EngineError(Exception):
    """Base class of errors the engine raises to callers."""


class InvalidRequestError(EngineError):
    """Bad request (-> INVALID_ARGUMENT). `field` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ResourceExhaustedError(EngineError):
    """Queue, KV cache or concurrency limit reached (-> RESOURCE_EXHAUSTED)."""


class EngineUnavailableError(EngineError):
    """Engine loading, draining, or a rank died (-> UNAVAILABLE)."""


class EngineStartError(EngineError, RuntimeError):
    """A rank or the engine core could not start (model load failed, a worker died during start-up)."""


class InvalidPolicyError(EngineError):
    """A routing-policy switch names an unknown policy or bad parameters (-> INVALID_ARGUMENT);
    the message names the key, or lists the registered policies. The policy is unchanged."""


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens or max_model_len reached
    STOP = "stop"  # EOS, a stop token id, or a stop string
    CANCELLED = "cancelled"  # the caller went away / cancelled
    ERROR = "error"  # the engine failed this request (logged with context)


# Temperatures below this are greedy. Why a floor: logits / T overflows float32 for T ~ 1e-38
# (|logit| ~ 10 over 3.4e38), which turned such requests into token 0 or other wrong tokens.
# At 1e-5 a logit gap of 1e-4 is already 10 after scaling, which the Gumbel noise crosses with
# probability 5e-5: lower temperatures could only differ from greedy at ties closer than that.
# vLLM treats temperatures below the same 1e-5 as greedy.
MIN_TEMPERATURE = 1e-5

# The most alternatives a request may ask for per position (OpenAI's top_logprobs limit). The
# device computes this many for every row of a step that has a request asking: one fixed shape.
MAX_TOP_LOGPROBS = 20
MAX_N = 16  # the most sequences one request may ask for (GenerationRequest.n)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (or anything below MIN_TEMPERATURE) means greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None  # None: the engine draws one; results are reproducible per seed
    min_p: float = 0.0  # in [0, 1]: drop tokens less likely than min_p x the most likely one (0: no cut)
    # Penalties on tokens already seen, applied to the logits before temperature (greedy too):
    repetition_penalty: float = 1.0  # > 0: a seen token's logit is divided (> 0) or multiplied (< 0) by it; prompt too
    presence_penalty: float = 0.0  # subtracted once from each token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence of each token generated so far

    @property
    def penalized(self) -> bool:
        """Some penalty is on: the engine keeps per-sequence token counts on the device."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class StopParams:
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ()  # stop strings; the matched string is not included in the output text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids cannot be drawn (nor stop strings end it) before this many


class RoutedExpertsMode(enum.IntEnum):
    """Which forward positions' routed experts a request gets back (GenerationChunk.routed_experts)."""

    NONE = 0
    GENERATED = 1  # one row per generated token: the position that produced it
    WITH_PROMPT = 2  # and, before the first, the prompt positions that produced no token


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stops: StopParams = field(default_factory=StopParams)
    logprobs: bool = False  # return the log-probability of each sampled token
    top_logprobs: int = 0  # also the N most likely tokens at each generated position (0..MAX_TOP_LOGPROBS)
    prompt_logprobs: bool = False  # the log-probability of each prompt token after the first, with the first chunk
    #: independent sequences from the one prompt (GenerationChunk.index); they share the prompt's KV
    #: blocks. With a seed, sequence i samples with seed + i (mod 2**64).
    n: int = 1
    routed_experts: RoutedExpertsMode = RoutedExpertsMode.NONE


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float  # from admission (submit) to the first generated token


@dataclass(frozen=True)
class GenerationChunk:
    """New tokens since the previous chunk. The last chunk has finish_reason and usage set."""

    token_ids: tuple[int, ...]
    text: str  # text delta (may be empty while a multi-byte character or a possible stop string is held back)
    logprobs: tuple[float, ...] | None = None
    #: per token the request's top_logprobs most likely (token id, logprob), best first
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    #: prompt_logprobs asked for: on the first chunk, one per prompt token after the first
    prompt_logprobs: tuple[float, ...] | None = None
    #: prompt_logprobs with top_logprobs: per prompt position after the first, its top_logprobs
    #: most likely (token id, logprob), best first, aligned with prompt_logprobs
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    #: uint16 little-endian [rows, MoE layers, top_k] logical expert ids (routed_experts asked for)
    routed_experts: bytes | None = None
    index: int = 0  # which of the request's n sequences (each ends with its own finish_reason)


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    architecture: str
    num_layers: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    dtype: str
    device: str
    ep_size: int
    routing_policy: str  # canonical registered name
    routing_params: Mapping[str, Any]
    eos_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RoutingPolicyState:
    """The policy every EP rank runs, and since when (GetRoutingPolicy / SetRoutingPolicy)."""

    name: str  # canonical registered name
    params: Mapping[str, Any]
    guarantee: str
    counters_reset_unix_s: float = 0.0  # when the switch to it reset the load counters (0: never switched)
    since_step: int = 0  # forward steps before the first one it ran


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences in the running batch (all ranks)
    waiting: int  # admitted, waiting for KV space or a batch slot
    kv_blocks_used: int
    kv_blocks_total: int
    steps: int  # engine steps executed since start


class Engine(Protocol):
    """What the gRPC service needs from the engine (implemented by server.frontend.client)."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...
    @property
    def vocab_size(self) -> int: ...

    def model_info(self) -> ModelInfo: ...
    def stats(self) -> EngineStats: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Admit the request and stream its chunks. Raises InvalidRequestError /
        ResourceExhaustedError / EngineUnavailableError before the first chunk. Closing or
        cancelling the iterator frees the sequence (and its KV blocks) at once."""
        ...

    async def expert_load(self, reset: bool = False) -> "ExpertLoadSnapshot": ...  # noqa: F821

    def routing_policy(self) -> RoutingPolicyState: ...

    async def set_routing_policy(self, routing: Mapping[str, Any]) -> RoutingPolicyState:
        """Switch every rank to the policy the routing.* mapping names ({"name": ..., **params})
        between two steps; returns once they run it. InvalidPolicyError: nothing changed."""
        ...

    # Life cycle (server.frontend.client.EngineClient implements these; a server should use them
    # to exit non-zero when the engine dies, even while no request is in flight).
    @property
    def failure(self) -> str | None:
        """Why the engine died, or None while it is healthy. A dead engine never recovers."""
        ...

    def add_failure_callback(self, callback: "Callable[[str], None]") -> None:
        """Run `callback(reason)` once, on an engine thread, when the engine dies."""
        ...

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop serving: in-flight requests end with EngineUnavailableError, ranks exit."""
        ...
