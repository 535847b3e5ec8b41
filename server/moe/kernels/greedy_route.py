"""Triton kernel for `greedy_balanced`: one program per block of independent super-rounds.

Same function as `server.moe.routing.greedy.greedy_balanced_torch` (see its docstring for why
super-rounds of T = lcm(E, k) / k tokens are independent). A program keeps its rounds' expert
loads in registers and walks their T tokens in order; each token's k picks are the k
smallest keys (load << 48 | -score << 16 | expert), taken at once with a bitonic top-k instead
of k sequential arg-min reductions. One launch, no host sync, no allocation beyond the output:
capturable in a CUDA graph.
"""
from __future__ import annotations

from math import lcm

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the torch path
    triton = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _greedy_balanced_kernel(
        scores_ptr,  # [N, E] router scores (any float dtype), row stride `stride_n`
        out_ptr,  # [N, K] int32
        n_tokens,
        stride_n,
        E: tl.constexpr,
        K: tl.constexpr,
        KP: tl.constexpr,  # next power of two >= max(K, 2) (bitonic top-k width)
        T: tl.constexpr,  # tokens per super-round
        BLOCK_E: tl.constexpr,  # next power of two >= E
        RB: tl.constexpr,  # super-rounds per program
    ):
        BIG: tl.constexpr = 0x7FFFFFFFFFFFFFFF
        pid = tl.program_id(0)
        rounds = pid * RB + tl.arange(0, RB)  # [RB]
        offs_e = tl.arange(0, BLOCK_E)  # [BLOCK_E]
        offs_k = tl.arange(0, KP)  # [KP]
        e_ok = offs_e < E
        load = tl.zeros([RB, BLOCK_E], dtype=tl.int64)  # [RB, BLOCK_E] picks per expert in this round
        for t in range(T):
            tok = rounds * T + t  # [RB]
            t_ok = tok < n_tokens
            s = tl.load(
                scores_ptr + tok[:, None].to(tl.int64) * stride_n + offs_e[None, :],
                mask=t_ok[:, None] & e_ok[None, :], other=0.0,
            ).to(tl.float32)  # [RB, BLOCK_E]
            bits = s.to(tl.int32, bitcast=True)
            wide = bits.to(tl.int64)
            # IEEE-754 order map, reversed: higher score -> smaller key (matches the torch path).
            desc = tl.where(bits < 0, wide + 4294967296, 2147483647 - wide)
            key = (load << 48) | (desc << 16) | offs_e[None, :].to(tl.int64)  # [RB, BLOCK_E]
            key = tl.where(e_ok[None, :], key, BIG)
            best = BIG - tl.topk(BIG - key, KP, dim=1)  # [RB, KP] ascending keys = pick order
            kth = tl.max(tl.where(offs_k[None, :] < K, best, -1), axis=1)  # [RB] k-th smallest key
            load += (key <= kth[:, None]).to(tl.int64)  # keys are unique: exactly the k picks
            ids = (best & 0xFFFF).to(tl.int32)  # [RB, KP]
            tl.store(
                out_ptr + tok[:, None].to(tl.int64) * K + offs_k[None, :], ids,
                mask=t_ok[:, None] & (offs_k[None, :] < K),
            )


def greedy_balanced_triton(router_logits: torch.Tensor, top_k: int, rounds_per_program: int = 1, num_warps: int | None = None) -> torch.Tensor:
    """[N, E] router scores -> [N, k] int32 ids (seed's rule, router-score tie-breaks)."""
    n, num_experts = router_logits.shape
    if num_experts >= 1 << 16:
        raise ValueError(f"greedy_balanced supports up to 65535 experts, got {num_experts}")
    out = torch.empty(n, top_k, dtype=torch.int32, device=router_logits.device)
    if n == 0:
        return out
    scores = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    tokens_per_round = lcm(num_experts, top_k) // top_k
    rounds = -(-n // tokens_per_round)
    block_e = triton.next_power_of_2(num_experts)
    grid = (-(-rounds // rounds_per_program),)
    _greedy_balanced_kernel[grid](
        scores, out, n, scores.stride(0),
        E=num_experts, K=top_k, KP=max(2, triton.next_power_of_2(top_k)), T=tokens_per_round,
        BLOCK_E=block_e, RB=rounds_per_program,
        num_warps=num_warps or (1 if block_e <= 256 else 4),
    )
    return out
