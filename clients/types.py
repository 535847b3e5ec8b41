"""Plain, typed results of the epserve client (no protobuf types leave the client)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_new_tokens or max_model_len reached
    STOP = "stop"  # end-of-sequence token, a stop token id or a stop string
    CANCELLED = "cancelled"  # cancelled on the server (e.g. drained at shutdown)


class ServingState(str, enum.Enum):
    UNKNOWN = "unknown"
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    total_time_s: float


@dataclass(frozen=True)
class Chunk:
    """One streamed message: tokens new in it and their text. The last one has
    finish_reason and usage set."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    request_id: str = ""
    #: [rows][MoE layers][top_k] logical expert ids, when the request asked for them (one row per
    #: token, the first message also the prompt's rows with include_prompt)
    routed_experts: list[list[list[int]]] | None = None
    #: top_logprobs asked for: per token its top_logprobs most likely (token id, logprob), best first
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    #: prompt_logprobs asked for, in a sequence's first message: each prompt token's after the first
    prompt_logprobs: tuple[float, ...] | None = None
    #: prompt_logprobs with top_logprobs: those prompt positions' most likely (token id, logprob)
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    index: int = 0  # n > 1: which sequence this message belongs to


@dataclass(frozen=True)
class Completion:
    """A finished generation (from generate(), or collected from a stream)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    logprobs: tuple[float, ...] | None = None
    request_id: str = ""
    #: [rows][MoE layers][top_k]: every position behind the tokens (prompt_tokens - 1 rows more
    #: before them with include_prompt), when asked for with return_routed_experts. Row i is the
    #: forward that produced token i, so it is one position behind: the first row is the prompt's
    #: last position. For vLLM's layout use prompt_routed_experts / completion_routed_experts.
    routed_experts: list[list[list[int]]] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None  # as Chunk.top_logprobs, every token
    prompt_logprobs: tuple[float, ...] | None = None  # prompt_tokens - 1 values (prompt_logprobs; n > 1: sequence 0)
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None  # with top_logprobs too
    index: int = 0  # which of the request's n sequences
    #: n > 1: every sequence's Completion in index order (this object's own fields are sequence
    #: 0's; usage.completion_tokens is its own too); empty for n = 1
    choices: tuple["Completion", ...] = ()

    @property
    def prompt_routed_experts(self) -> list[list[list[int]]] | None:
        """vLLM's prompt_routed_experts: [prompt_tokens][MoE layers][top_k], one row per prompt
        token (its forward position). None unless the request set include_prompt."""
        rows, prompt = self.routed_experts, self.usage.prompt_tokens
        if rows is None or len(rows) != prompt + len(self.token_ids) - 1:
            return None
        return rows[:prompt]

    @property
    def completion_routed_experts(self) -> list[list[list[int]]] | None:
        """vLLM's layout for the generated tokens: [completion_tokens - 1][MoE layers][top_k], the
        positions of the generated tokens that were fed back (the last one never runs a forward)."""
        if self.routed_experts is None:
            return None
        return self.routed_experts[len(self.routed_experts) - len(self.token_ids) + 1:]


@dataclass(frozen=True)
class RoutingPolicyInfo:
    name: str
    params: Mapping[str, Any]
    guarantee: str
    counters_reset_unix_s: float = 0.0  # when a switch to it reset the expert-load counters (0: never switched)
    since_engine_step: int = 0  # engine steps before the first one that ran it


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
    routing: RoutingPolicyInfo
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class LayerExpertLoad:
    layer: int
    expert_tokens: tuple[int, ...]  # [num_experts]
    rank_tokens: tuple[int, ...]  # [ep_size]
    tokens: int
    expert_max_over_mean: float
    rank_max_over_mean: float
    mean_ranks_per_token: float
    rank_active_experts: tuple[int, ...] = ()  # [ep_size] experts on each rank that got >= 1 token
    rank_balancedness: float = 0.0  # mean/max over ranks (1.0 perfect; 0 when nothing was routed)
    expert_balancedness: float = 0.0  # mean/max over experts


@dataclass(frozen=True)
class ExpertLoad:
    """Counts since the last reset, summed over EP ranks."""

    num_layers: int
    num_experts: int
    ep_size: int
    layers: tuple[LayerExpertLoad, ...]
    rank_totals: tuple[int, ...]  # [ep_size], summed over layers
    expert_max_over_mean: float  # means over layers
    rank_max_over_mean: float
    mean_ranks_per_token: float
    tokens_per_layer: float
    seconds_since_reset: float
    reset: bool
    #: per-layer mean/max load aggregated over layers: {"min", "p50", "p90", "avg"} (0s when idle)
    rank_balancedness: Mapping[str, float] = field(default_factory=dict)
    expert_balancedness: Mapping[str, float] = field(default_factory=dict)
    engine_step: int = 0  # forward steps run when read; the counts include that step

    def matrix(self) -> list[list[int]]:
        """[layer][expert] token counts (for tables and heatmaps)."""
        return [list(layer.expert_tokens) for layer in self.layers]


@dataclass(frozen=True)
class ServerStats:
    active_calls: int
    running_sequences: int
    waiting_sequences: int
    kv_blocks_used: int
    kv_blocks_total: int
    engine_steps: int
    requests_by_code: Mapping[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ServerInfo:
    version: str
    uptime_s: float
    state: ServingState
    config: Mapping[str, Any]
    stats: ServerStats
