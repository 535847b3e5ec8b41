"""`uniform_random`: seeded random scores, then top-k (what SGLang, Megatron and vLLM do).

Each (token, expert) pair gets a hashed 32-bit score from (seed, layer, rank, global token
index, expert); the k largest win. Balanced only in expectation: per-expert loads follow a
multinomial spread around N*k/E. The global token index (token_offset + i) makes the draw
independent of how a step's tokens are split over ranks. On CUDA a Triton kernel
(server/moe/kernels/uniform_random_route.py) computes the same ids in one pass.
"""
from __future__ import annotations

import torch

from ..kernels.uniform_random_route import triton_available, uniform_random_triton
from .base import RoutingPolicy
from .context import RoutingContext
from .hashing import mix32, stream_key
from .registry import register_policy


def hashed_scores(n: int, num_experts: int, key: int, token_offset, device) -> torch.Tensor:
    """[N, E] int64 random scores with the expert id in the low bits (unique per row)."""
    token = torch.arange(n, device=device, dtype=torch.int64) + token_offset  # [N]
    expert = torch.arange(num_experts, device=device, dtype=torch.int64)  # [E]
    h = mix32(mix32(token * 0x3C6EF372 + key)[:, None] ^ (expert * 0x1B873593))  # [N, E]
    return (h << 16) | expert


def uniform_random_torch(n: int, num_experts: int, top_k: int, key: int, token_offset, device) -> torch.Tensor:
    """[N, k] int32: the k largest hashed scores per token, best first."""
    scores = hashed_scores(n, num_experts, key, token_offset, device)  # [N, E]
    return scores.topk(top_k, dim=1, sorted=True).indices.to(torch.int32)  # [N, k]


@register_policy("uniform_random")
class UniformRandomPolicy(RoutingPolicy):
    guarantee = "balanced only in expectation"

    def route(self, topk_ids, topk_weights, router_logits, ctx: RoutingContext) -> torch.Tensor:
        n = topk_ids.shape[0]
        key = stream_key(self.seed, ctx.seed, ctx.layer)
        if topk_ids.is_cuda and triton_available():  # same ids, one fused kernel
            return uniform_random_triton(n, ctx.num_experts, ctx.top_k, key, ctx.token_offset, topk_ids.device)
        return uniform_random_torch(n, ctx.num_experts, ctx.top_k, key, ctx.token_offset, topk_ids.device)
