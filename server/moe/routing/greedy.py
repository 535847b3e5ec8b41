"""`greedy_balanced` (alias `fake_balance`): LightLLM's fake-balance rule with router-score tie-breaks.

LightLLM's fake balance (PR #962) walks tokens in order; each of a token's k slots takes a
least-loaded expert the token has not chosen yet, ties broken at random. Loads then never
differ by more than one, so on each rank every expert ends with floor(N*k/E) or one more.
Here ties go to the expert the router scores highest for that token (equal scores: lower
expert id), so the assignment is deterministic and closer to the router than a random pick.
It is not the balanced assignment that keeps the most of the router: the walk keeps loads
within one at every prefix, not just per call, and that caps it well below per-call balance
(on the tiny eval model 33 % of the router's pairs against 51 % for `optimal_balanced`, which
solves the per-call assignment; docs/EVAL.md).

Why it parallelises: at a slot index that is a multiple of lcm(E, k) every expert has the
same load and no token is half-assigned, so the walk restarts from an identical state. The N
tokens therefore split into independent super-rounds of T = lcm(E, k) / k tokens (T = E/k
when E % k == 0: each expert exactly once per round). Within a super-round the walk is
sequential over its T tokens, and a token's k slots collapse into one step: the loads of the
experts it may still take do not change while it picks, so its k picks are the k smallest
keys (load, -score, expert id). The torch path below runs T vectorised steps over all
super-rounds at once; on CUDA a kernel runs one program per super-round (see
server/moe/kernels/greedy_route_cuda.py for the bf16/fp16 one, greedy_route.py for the rest).
"""
from __future__ import annotations

from math import lcm

import torch

from ..kernels.greedy_route_cuda import greedy_balanced_cuda
from .base import RoutingPolicy
from .context import RoutingContext
from .registry import register_policy

_MASK32 = 0xFFFFFFFF


def descending_score_keys(scores: torch.Tensor) -> torch.Tensor:
    """[N, E] float -> [N, E] int64 key, smaller = preferred: (-score, expert id), unique per row."""
    num_experts = scores.shape[1]
    bits = scores.float().contiguous().view(torch.int32).to(torch.int64) & _MASK32  # [N, E]
    negative = bits >= 0x80000000
    # Order-preserving map of IEEE-754 bits, reversed so that higher scores get smaller keys.
    desc = torch.where(negative, bits, 0x7FFFFFFF - bits)
    expert = torch.arange(num_experts, device=scores.device, dtype=torch.int64)
    return (desc << 16) | expert  # [N, E], < 2**48


def greedy_balanced_torch(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, E] router scores -> [N, k] int32 ids by LightLLM's rule (score tie-break)."""
    n, num_experts = router_logits.shape
    if num_experts >= 1 << 16:
        raise ValueError(f"greedy_balanced supports up to 65535 experts, got {num_experts}")
    if n == 0:
        return torch.empty(0, top_k, dtype=torch.int32, device=router_logits.device)
    tokens_per_round = lcm(num_experts, top_k) // top_k
    rounds = -(-n // tokens_per_round)
    padded = rounds * tokens_per_round
    scores = router_logits
    if padded != n:  # trailing pad tokens are walked after every real token, so they change nothing
        scores = torch.cat([scores, scores.new_zeros(padded - n, num_experts)])
    static = descending_score_keys(scores).view(rounds, tokens_per_round, num_experts)  # [R, T, E]
    load = torch.zeros(rounds, num_experts, dtype=torch.int64, device=scores.device)  # [R, E]
    ones = torch.ones(rounds, top_k, dtype=torch.int64, device=scores.device)  # [R, k]
    out = torch.empty(rounds, tokens_per_round, top_k, dtype=torch.int64, device=scores.device)
    for t in range(tokens_per_round):
        key = (load << 48) | static[:, t]  # [R, E]; load < 2**14 within a super-round
        picked = key.topk(top_k, dim=1, largest=False, sorted=True).indices  # [R, k], pick order
        out[:, t] = picked
        load.scatter_add_(1, picked, ones)
    return out.view(padded, top_k)[:n].to(torch.int32)


def greedy_balanced_ids(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """On CUDA: the ballot-chain CUDA kernel where it applies (bf16/fp16, E % k == 0, E <= 256,
    E/k <= 32), else the Triton kernel; the torch path elsewhere. All three give identical ids."""
    if router_logits.is_cuda:
        ids = greedy_balanced_cuda(router_logits, top_k)
        if ids is not None:
            return ids
        from ..kernels.greedy_route import greedy_balanced_triton, triton_available

        if triton_available():
            return greedy_balanced_triton(router_logits, top_k)
    return greedy_balanced_torch(router_logits, top_k)


@register_policy("greedy_balanced", aliases=("fake_balance",))
class GreedyBalancedPolicy(RoutingPolicy):
    guarantee = "per-expert load within ±1 on each rank; router scores break ties"

    def route(self, topk_ids, topk_weights, router_logits, ctx: RoutingContext) -> torch.Tensor:
        return greedy_balanced_ids(router_logits, ctx.top_k)
