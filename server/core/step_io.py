"""What goes into EngineCore and what comes out of one step: plain data, no tokenizer, no asyncio.

The same objects are used by the core loop and across the pipe to the front end
(server/core/messages.py carries them as msgpack), so they hold only ints, floats,
strings, lists and enums. Text never reaches the core: prompts arrive as token ids, stop
strings are matched where the text is (the front end), which aborts the request on a match.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..moe.load_stats import ExpertLoadSnapshot
from ..engine.api import FinishReason, RoutedExpertsMode, SamplingParams, StopParams


@dataclass(frozen=True)
class EngineRequest:
    """One request as the core sees it. `stops.stop` (strings) is ignored by the core: only the
    token-level stops (max_new_tokens, stop_token_ids, EOS unless ignore_eos) end a sequence here."""

    req_id: int  # unique among the requests the core holds; chosen by the caller
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stops: StopParams = field(default_factory=StopParams)
    logprobs: bool = False
    routed_experts: RoutedExpertsMode = RoutedExpertsMode.NONE
    top_logprobs: int = 0  # GenerationRequest.top_logprobs
    prompt_logprobs: bool = False
    #: >= 0: a request with the same prompt, added before this one, whose prompt KV blocks this
    #: one shares (GenerationRequest.n); -1: none
    prefix_of: int = -1


@dataclass
class StepOutputs:
    """Everything one engine step produced, for every request at once (one message per step).

    Columns are aligned: request `req_ids[i]` got the tokens `token_ids[i]` (today one per step),
    with `logprobs[i]` (None unless it asked for them), and `finished` names the requests this
    step ended by a token-level stop (STOP) or a length cap (LENGTH); the core has already freed
    them. A request absent from `req_ids` got no token this step (a prompt chunk, or waiting).
    """

    req_ids: list[int] = field(default_factory=list)  # [R]
    token_ids: list[list[int]] = field(default_factory=list)  # [R][n]
    logprobs: list[list[float] | None] = field(default_factory=list)  # [R][n] or None
    finished: dict[int, FinishReason] = field(default_factory=dict)  # req_id -> reason
    forward_steps: int = 0  # forward steps executed since start (after this one)
    expert_load: ExpertLoadSnapshot | None = None  # answer to the tickets in `load_tickets`
    load_tickets: list[int] = field(default_factory=list)  # request_expert_load tickets this step answers
    rebalance: Any = None  # an EPLB RebalanceReport when this step rebalanced
    routing: str | None = None  # the policy (repr) every rank switched to before this step's forward
    #: [R] per request, uint16 bytes [rows, MoE layers, k] of the positions behind its tokens
    #: (RoutedExpertsMode; None where not asked for); None when no request of the step asked
    routed: list[bytes | None] | None = None
    #: [R] per request [ids, logprobs] of its top_logprobs most likely tokens (None where not asked
    #: for); None when no request of the step asked
    top_logprobs: list[list | None] | None = None
    #: [R] per request the prompt logprobs not yet sent (sent with its first token; None where
    #: not asked for); None when no request of the step asked
    prompt_logprobs: list[list[float] | None] | None = None
    #: aligned with prompt_logprobs: [ids [P][N], logprobs [P][N]] of each prompt position's
    #: top_logprobs most likely next tokens (None where the request asked for no top_logprobs)
    prompt_top_logprobs: list[list | None] | None = None

    @property
    def is_empty(self) -> bool:
        return not self.req_ids and not self.load_tickets and self.rebalance is None and self.routing is None
