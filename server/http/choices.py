"""OpenAI choices <-> engine requests: n sequences per prompt, each prompt's choices in a row.

OpenAI numbers the choices of a request with several prompts prompt-major: prompt i's j-th
completion is choice i * n + j. The engine serves n from one request (GenerationRequest.n:
the sequences share the prompt's KV blocks; chunk.index says which), except where every
choice needs its own prompt log-probabilities (echo with logprobs): the engine computes them
while it prefills, and forked sequences skip the prefill, so there each choice runs as its
own request. Under a seed, copy j samples with seed + j, the seed the engine gives sequence j
of an n-request, so the choices are reproducible either way.
"""
from __future__ import annotations

from dataclasses import dataclass

from clients.pb import generation_pb2 as gen_pb

_SEED_MOD = 1 << 64


@dataclass(frozen=True)
class ChoiceLayout:
    """Which engine request (and which of its sequences) each choice is."""

    first_choice: tuple[int, ...]  # per engine request: its first choice's index
    request_of: tuple[int, ...]  # per choice: its engine request
    prompt_of: tuple[int, ...]  # per choice: its prompt (for echo and usage)

    @property
    def total(self) -> int:
        return len(self.request_of)

    def choice(self, request: int, index: int) -> int:
        """The choice of sequence `index` (GenerationChunk.index) of engine request `request`."""
        return self.first_choice[request] + index

    def counts_prompt(self, choice: int) -> bool:
        """Usage counts each prompt once, with its first choice (as OpenAI and vLLM do)."""
        return choice == 0 or self.prompt_of[choice] != self.prompt_of[choice - 1]


def fan_out(per_prompt: list[gen_pb.GenerateRequest], n: int, own_prompt_logprobs: bool
            ) -> tuple[tuple[gen_pb.GenerateRequest, ...], ChoiceLayout]:
    """One request per prompt, asking n sequences -> the engine requests and their layout.
    `own_prompt_logprobs`: each choice gets its own request (see the module docstring)."""
    requests: list[gen_pb.GenerateRequest] = []
    first, request_of, prompt_of = [], [], []
    for p, base in enumerate(per_prompt):
        copies = n if own_prompt_logprobs and n > 1 else 1
        for j in range(copies):
            req = base
            if copies > 1:
                req = gen_pb.GenerateRequest()
                req.CopyFrom(base)
                req.request_id = f"{base.request_id}-{j}"
                if base.sampling.HasField("seed"):
                    req.sampling.seed = (base.sampling.seed + j) % _SEED_MOD
            elif n > 1:
                req.n = n
            first.append(len(request_of))
            sequences = 1 if copies > 1 else n
            request_of.extend([len(requests)] * sequences)
            prompt_of.extend([p] * sequences)
            requests.append(req)
    return tuple(requests), ChoiceLayout(tuple(first), tuple(request_of), tuple(prompt_of))
