"""The requests the engine-mode benchmark submits: seeded prompts of random token ids.

Workloads are registered by name (`bench.workload`), each a rule for the prompt lengths:

  fixed     every prompt has bench.input_len tokens (a static batch)
  lightllm  lengths spread around bench.input_len: uniform integers in
            [L - spread*L, L + spread*L] (bench.length_spread, 0.5 by default: 32..96 at L=64,
            so B=128 prompts take ~55 distinct lengths) — the shape of LightLLM's EP
            measurement (batch 128, inputs of about 64 tokens, 64 new tokens), with the ragged
            prefill batches a server really sees.

Every request asks for exactly `output_len` tokens (EOS ignored) and decodes greedily, so a
repetition of the same set under the same policy runs the same steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ConfigError

LengthRule = Callable[[int, int, float, torch.Generator], list[int]]  # (batch, input_len, spread, gen) -> lengths


def _fixed(batch: int, input_len: int, spread: float, gen: torch.Generator) -> list[int]:
    return [input_len] * batch


def _spread(batch: int, input_len: int, spread: float, gen: torch.Generator) -> list[int]:
    half = int(round(spread * input_len))
    lo = max(1, input_len - half)
    return torch.randint(lo, input_len + half + 1, (batch,), generator=gen).tolist()


WORKLOADS: dict[str, LengthRule] = {"fixed": _fixed, "lightllm": _spread}


@dataclass(frozen=True)
class RequestSet:
    prompts: tuple[tuple[int, ...], ...]  # [B] token ids each
    output_len: int  # new tokens per request

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def prompt_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def decode_tokens(self) -> int:
        """Tokens made by decode steps: the prefill step makes each request's first."""
        return self.batch * (self.output_len - 1)

    @property
    def max_total_len(self) -> int:
        return max(self.lengths) + self.output_len


def build_request_set(workload: str, *, batch: int, input_len: int, output_len: int, vocab_size: int, seed: int,
                      spread: float = 0.5) -> RequestSet:
    """`batch` prompts under `workload`'s length rule, token ids uniform in [0, vocab_size)."""
    rule = WORKLOADS.get(workload)
    if rule is None:
        raise ConfigError(f"bench.workload={workload!r} is not one of {sorted(WORKLOADS)}")
    gen = torch.Generator().manual_seed(seed)
    lengths = rule(batch, input_len, spread, gen)
    prompts = tuple(tuple(torch.randint(0, vocab_size, (n,), generator=gen).tolist()) for n in lengths)
    return RequestSet(prompts, output_len)
