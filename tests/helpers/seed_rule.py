"""The seed's balancing rule (LightLLM `--enable_ep_fake_balance`), kept as a reference.

`seed_rule_reference` is a plain loop over tokens and slots: each slot takes a least-loaded
expert not yet chosen by this token. Ties go to the highest router score (then lower id) --
the rule greedy_balanced promises -- instead of the seed's random pick.

`seed_generator_torch` reproduces the seed's generator as written there (torch ops per token
and slot on the device, random ties, host syncs through tensor-size-dependent indexing); the
policy benchmark times it as the baseline.
"""
from __future__ import annotations

import torch


def seed_rule_reference(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, E] scores -> [N, k] int32 ids, one slot at a time."""
    n, num_experts = scores.shape
    rows = scores.double().tolist()
    load = [0] * num_experts
    out = []
    for i in range(n):
        chosen: list[int] = []
        for _ in range(top_k):
            best = None
            for e in range(num_experts):
                if e in chosen:
                    continue
                key = (load[e], -rows[i][e], e)
                if best is None or key < best[0]:
                    best = (key, e)
            chosen.append(best[1])
            load[best[1]] += 1
        out.append(chosen)
    return torch.tensor(out, dtype=torch.int32).view(n, top_k)


def seed_generator_torch(num_tokens: int, num_experts: int, top_k: int, device: str = "cpu") -> torch.Tensor:
    """The seed's generator: per-token, per-slot torch ops with random tie-breaks."""
    out = torch.zeros((num_tokens, top_k), dtype=torch.int32, device=device)
    load = torch.zeros(num_experts, dtype=torch.int32, device=device)
    for i in range(num_tokens):
        available = torch.arange(num_experts, device=device)
        selected = []
        for _ in range(top_k):
            current = load[available]
            candidates = torch.where(current == current.min())[0]  # host sync: data-dependent size
            if len(candidates) > 1:
                pick = candidates[torch.randint(0, len(candidates), (1,), device=device)].item()
            else:
                pick = candidates[0].item()
            expert = available[pick]
            selected.append(expert)
            available = torch.cat([available[:pick], available[pick + 1:]])
            load[expert] += 1
        out[i] = torch.stack(selected).to(torch.int32)
    return out
