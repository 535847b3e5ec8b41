"""A launched step's outputs on their way to the host.

On CUDA the sampler's outputs (tokens, logprobs, top-N, prompt logprobs) are copied to pinned
host memory without blocking, and an event after them says when they are there: the engine
plans the next step meanwhile. On CPU everything is there already.
"""
from __future__ import annotations

import torch

from .step_plan import RankResult


class PendingStep:
    """A launched step; `result()` gives its RankResult once the device has finished it."""

    def __init__(self, result: RankResult, tokens: torch.Tensor | None = None, logprobs: torch.Tensor | None = None,
                 event=None, routed: torch.Tensor | None = None, extras: dict | None = None) -> None:
        self._result, self._tokens, self._logprobs, self._event = result, tokens, logprobs, event
        self._routed = routed  # [R, MoE layers, k] int16 on the host (routed_experts.py)
        self._extras = extras  # RankResult attribute -> host tensor (top-N, prompt logprobs)

    def result(self) -> RankResult:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        if self._tokens is not None:
            self._result.tokens = self._tokens.numpy()
            self._result.logprobs = self._logprobs.numpy() if self._logprobs is not None else None
            self._tokens = self._logprobs = None
        if self._routed is not None:
            self._result.routed = self._routed.numpy()
            self._routed = None
        if self._extras:
            for name, value in self._extras.items():
                setattr(self._result, name, value.numpy())
            self._extras = None
        return self._result


def pending_step(device: torch.device, result: RankResult, tokens, logprobs, routed, extra_out: dict) -> PendingStep:
    """The step's outputs on their way to the host (copies queued, not waited for, on CUDA).
    tokens [R] int64 / logprobs [R] float32 or None; extra_out: RankResult attribute -> tensor."""
    if device.type != "cuda":
        return PendingStep(result, tokens, logprobs, routed=routed, extras=extra_out)
    tokens_host = tokens.to("cpu", non_blocking=True) if tokens is not None else None  # pinned: no block
    logprobs_host = logprobs.to("cpu", non_blocking=True) if logprobs is not None else None
    extra_host = {k: v.to("cpu", non_blocking=True) for k, v in extra_out.items()}
    return PendingStep(result, tokens_host, logprobs_host, event_after(device), routed, extra_host)


def event_after(device: torch.device):
    """A CUDA event after the work queued so far (None on CPU, where the step ran to the end)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(blocking=True)  # the waiting thread sleeps instead of spinning (and holding a core)
    event.record()
    return event
