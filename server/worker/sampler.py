"""Token sampling that does not depend on how requests are batched.

Greedy (temperature 0) is argmax. A request is sampled at temperature 0 when it asks for less
than MIN_TEMPERATURE (logits / T would overflow float32 and pick wrong tokens) or for top_k 1
(only the best token is kept, so scaling could add ties or overflow, never another answer):
`sampling_temperature` applies that rule once, where a request's parameters enter a step.
Otherwise: scale by 1/temperature, cut to top-k and top-p, then Gumbel-max with noise that is
a counter-based hash of (seed, position, token id) — no torch.Generator, no state. A
request's draw at a position is therefore the same whichever other requests share its step,
on whichever rank it runs, and after a preemption recomputes it. (Results can still differ
where the model's logits themselves differ across batch shapes, e.g. GPU GEMM tilings, and
only at near-ties.)

Before any of that, per row and only where asked: penalties on seen tokens (penalties.py) and
the min_tokens ban (EOS and stop ids at -inf until a sequence has min_tokens); after the
temperature, min_p drops tokens less likely than min_p x the best one. Each is a host-side
flag of the step (no device sync) and fixed-shape tensor work.

Logprobs are those of the model's raw distribution (log_softmax of the logits), before
penalties, temperature, top-k, top-p and min_p.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..moe.routing.hashing import MASK32, mix32, stream_key
from ..engine.api import MIN_TEMPERATURE
from .penalties import PenaltyParams, PenaltyState
from .step_plan import SampleSpec

_SAMPLER_STREAM = 0x53414D50  # "SAMP": keeps these draws apart from the routing policies'


@dataclass
class SamplingBatch:
    """Per-row sampling parameters for the rows of a logits tensor.

    With `hot_rows` (some rows greedy, some not), the four parameter tensors hold only the
    rows that draw ([H], in hot_rows order): the hashing, cuts and Gumbel noise then cost H
    rows of the vocabulary instead of S. Each row's draw is the same either way."""

    temperature: torch.Tensor  # [S] (or [H]) float32, 0 = greedy
    top_p: torch.Tensor  # [S] (or [H]) float32 in (0, 1]
    top_k: torch.Tensor  # [S] (or [H]) int64, 0 = no cut
    keys: torch.Tensor  # [S] (or [H]) int64: 32-bit hash of (seed, position)
    want_logprobs: bool
    all_greedy: bool  # host-side flags: decide the path without a device sync
    any_cut: bool  # some row has top-k or top-p
    hot_rows: torch.Tensor | None = None  # [H] int64 rows with temperature > 0; None: the parameters cover every row
    min_p: torch.Tensor | None = None  # [S] (or [H]) float32 in [0, 1]; None: no row cuts by min_p
    penalties: tuple[PenaltyState, PenaltyParams] | None = None  # some row has a penalty
    banned: torch.Tensor | None = None  # [S, B] int64 token ids to ban per row (repeats allowed); None: none
    ban_rows: torch.Tensor | None = None  # [S] bool rows whose `banned` ids are at -inf this step (min_tokens)

    @classmethod
    def from_specs(cls, specs: list[SampleSpec], positions: list[int], device: torch.device | str) -> "SamplingBatch":
        """`positions[i]`: index in its sequence of the token row i will produce."""
        return cls(
            temperature=torch.tensor([sampling_temperature(s.temperature, s.top_k) for s in specs],
                                     dtype=torch.float32, device=device),
            top_p=torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=device),
            top_k=torch.tensor([s.top_k for s in specs], dtype=torch.int64, device=device),
            keys=torch.tensor([sample_key(s.seed, p) for s, p in zip(specs, positions)], dtype=torch.int64, device=device),
            want_logprobs=any(s.logprobs for s in specs),
            all_greedy=all(sampling_temperature(s.temperature, s.top_k) <= 0 for s in specs),
            any_cut=any(sampling_temperature(s.temperature, s.top_k) > 0 and (s.top_k > 0 or s.top_p < 1)
                        for s in specs),
        )


def sampling_temperature(temperature: float, top_k: int) -> float:
    """The temperature a row is sampled at: 0 (greedy) below MIN_TEMPERATURE or with top_k 1.
    Decided from the request's own parameters, so never by the batch around it."""
    return 0.0 if temperature < MIN_TEMPERATURE or top_k == 1 else temperature


@dataclass(frozen=True)
class SamplingFlags:
    """The host-side switches of one step's sampling, from its rows' parameters (numpy)."""

    want_logprobs: bool
    all_greedy: bool
    any_cut: bool

    @classmethod
    def of(cls, temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray, logprobs: np.ndarray) -> "SamplingFlags":
        hot = temperature > 0
        return cls(want_logprobs=bool(logprobs.any()), all_greedy=not bool(hot.any()),
                   any_cut=bool((hot & ((top_k > 0) | (top_p < 1))).any()))


def sample_key(seed: int, position: int) -> int:
    return stream_key(_SAMPLER_STREAM, seed, position)


def seed_key(seed: int) -> int:
    """The part of sample_key that depends on the seed alone (computed once per request)."""
    return stream_key(_SAMPLER_STREAM, seed)


def _mix32_np(x: np.ndarray) -> np.ndarray:
    """hashing.mix32 on a numpy int64 array (the same integers)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & MASK32
    return x ^ (x >> 16)


def sample_keys(seed_keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[R] int64 keys, equal to sample_key(seed, position) row by row, for a whole batch:
    folding `position` (< 2**32) into the seed's key is one mix of key ^ position."""
    return _mix32_np(seed_keys.astype(np.int64) ^ (positions.astype(np.int64) & MASK32))


def hashed_uniform(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, V] float32 uniforms in (0, 1), a pure function of (key, token id)."""
    token = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)  # [V]
    h = mix32(keys[:, None] ^ mix32(token * 0x9E3779B1 + 0x632BE5AB)[None, :])  # [S, V] 32-bit
    # 24 high bits -> exactly representable float32, never 0 or 1.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / nucleus top-p to -inf. [S, V] -> [S, V]."""
    s, v = logits.shape
    sorted_logits, order = logits.sort(dim=1, descending=True)  # [S, V]
    rank = torch.arange(v, device=logits.device)[None, :]  # [1, V]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])  # [S, V]
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=1)  # [S, V]
    mass_before = probs.cumsum(dim=1) - probs  # [S, V] mass of strictly better tokens
    keep &= mass_before < top_p[:, None]  # the first token always stays
    masked_sorted = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, masked_sorted)


def min_p_mask(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set tokens with prob < min_p * max prob to -inf. scaled [S, V] (temperature applied), min_p [S].
    p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed; min_p 0 cuts nothing."""
    threshold = scaled.max(dim=1, keepdim=True).values + torch.log(min_p)[:, None]  # [S, 1]
    return scaled.masked_fill(scaled < threshold, float("-inf"))


def ban_tokens(logits: torch.Tensor, banned: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """logits [S, V]; banned [S, B] int64 ids (a row's list padded by repeating its first id);
    rows [S] bool. -> a copy with each chosen row's banned ids at -inf. Repeated ids write the
    same value, so the scatter is deterministic."""
    current = logits.gather(1, banned)  # [S, B]
    value = current.masked_fill(rows[:, None], float("-inf"))
    return logits.scatter(1, banned, value)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [S, V] float32 -> (tokens [S] int64, logprobs [S] float32 or None)."""
    raw = logits = logits.float()
    if batch.penalties is not None:
        state, params = batch.penalties
        logits = state.apply(logits, params)
    if batch.banned is not None:
        logits = ban_tokens(logits, batch.banned, batch.ban_rows)
    tokens = logits.argmax(dim=1)  # [S]
    if not batch.all_greedy:
        rows = batch.hot_rows
        hot = logits if rows is None else logits.index_select(0, rows)  # [S or H, V]
        greedy = batch.temperature <= 0
        temp = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
        scaled = hot / temp[:, None]
        if batch.min_p is not None:
            scaled = min_p_mask(scaled, batch.min_p)
        if batch.any_cut:
            scaled = top_k_top_p_mask(scaled, batch.top_k, batch.top_p)
        u = hashed_uniform(batch.keys, logits.shape[1])
        gumbel = -torch.log(-torch.log(u))
        drawn = (scaled + gumbel).argmax(dim=1)
        if rows is None:
            tokens = torch.where(greedy, tokens, drawn)
        else:
            tokens.index_copy_(0, rows, drawn)
    logprobs = None
    if batch.want_logprobs:
        logprobs = raw.log_softmax(dim=1).gather(1, tokens[:, None])[:, 0]  # [S]
    return tokens, logprobs
