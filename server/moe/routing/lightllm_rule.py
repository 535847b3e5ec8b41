"""LightLLM's fake-balance rule (`--enable_ep_fake_balance`, PR #962), written plainly: the slow oracle.

Not a policy and not on any serving path. Two plain versions of the rule `greedy_balanced`
implements, kept where both the tests and scripts/bench_policies.py can import them:

* `lightllm_rule_reference` -- a Python loop over tokens and slots: each slot takes a
  least-loaded expert the token has not chosen yet. Ties go to the highest router score (then
  the lower expert id), the deterministic tie-break greedy_balanced promises, instead of
  LightLLM's random pick. The tests compare greedy_balanced's ids with it exactly.
* `lightllm_generator_torch` -- LightLLM's generator as it is written there: torch ops per
  token and per slot on the device, random tie-breaks, a host sync per slot through
  data-dependent indexing. It ignores the router's scores; the tests compare load profiles
  with it, and the policy benchmark times it as the baseline of its ">= 10,000x" figure.
"""
from __future__ import annotations

import torch


def lightllm_rule_reference(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, E] scores -> [N, k] int32 ids, one slot at a time (score tie-breaks)."""
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


def lightllm_generator_torch(num_tokens: int, num_experts: int, top_k: int, device: str = "cpu") -> torch.Tensor:
    """[num_tokens, k] int32 ids from LightLLM's generator: per-token, per-slot torch ops, random ties."""
    out = torch.zeros((num_tokens, top_k), dtype=torch.int32, device=device)
    load = torch.zeros(num_experts, dtype=torch.int32, device=device)  # [E] experts' running load
    for i in range(num_tokens):
        available = torch.arange(num_experts, device=device)  # experts this token has not taken
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
