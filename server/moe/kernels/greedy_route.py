"""Triton kernel for `greedy_balanced`: one program per block of independent super-rounds.

Same function as `server.moe.routing.greedy.greedy_balanced_torch` (see its docstring for why
super-rounds of T = lcm(E, k) / k tokens are independent). A program keeps its rounds' expert
loads in registers and walks their T tokens in order; each token's k picks are the k
smallest keys (load | -score | expert), taken at once with a bitonic top-k instead of k
sequential arg-min reductions. bf16/fp16 scores map losslessly to 16 bits, so their keys fit
in int32 (half the sort work); fp32 scores use exact int64 keys. The next token's row is
prefetched while the current one sorts. One launch, no host sync, no allocation beyond the output:
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

    @triton.jit(do_not_specialize=["n_tokens"])  # one compile for every step size
    def _greedy_balanced_kernel(
        scores_ptr,  # [N, E] router scores, row stride `stride_n`
        out_ptr,  # [N, K] int32
        n_tokens,
        stride_n,
        E: tl.constexpr,
        K: tl.constexpr,
        KP: tl.constexpr,  # next power of two >= max(K, 2) (bitonic top-k width)
        T: tl.constexpr,  # tokens per super-round
        BLOCK_E: tl.constexpr,  # next power of two >= E
        RB: tl.constexpr,  # super-rounds per program
        SCORE16: tl.constexpr,  # scores are bf16/fp16: exact 32-bit keys (faster sort)
    ):
        pid = tl.program_id(0)
        rounds = pid * RB + tl.arange(0, RB)  # [RB]
        offs_e = tl.arange(0, BLOCK_E)  # [BLOCK_E]
        offs_k = tl.arange(0, KP)  # [KP]
        e_ok = offs_e < E
        if SCORE16:
            BIG = 0x7FFFFFFF
            load = tl.zeros([RB, BLOCK_E], dtype=tl.int32)  # [RB, BLOCK_E] picks per expert this round
        else:
            BIG = 0x7FFFFFFFFFFFFFFF
            load = tl.zeros([RB, BLOCK_E], dtype=tl.int64)
        tok = rounds * T  # [RB]
        s_next = tl.load(scores_ptr + tok[:, None].to(tl.int64) * stride_n + offs_e[None, :],
                         mask=(tok < n_tokens)[:, None] & e_ok[None, :], other=0.0)  # [RB, BLOCK_E]
        for t in range(T):
            tok = rounds * T + t  # [RB]
            t_ok = tok < n_tokens
            s = s_next
            nxt = tok + 1  # prefetch the next token's row while this one sorts
            s_next = tl.load(scores_ptr + nxt[:, None].to(tl.int64) * stride_n + offs_e[None, :],
                             mask=((nxt < n_tokens) & (t + 1 < T))[:, None] & e_ok[None, :], other=0.0)
            if SCORE16:
                # Loads differ by at most one inside a super-round and the minimum before token t
                # is floor(t*K/E), so one bit of level suffices: level | -score (16 bits) | expert.
                bits = s.to(tl.int16, bitcast=True).to(tl.int32)
                desc = tl.where(bits < 0, bits + 65536, 32767 - bits)  # higher score -> smaller
                level = load - (t * K) // E
                key = (level << 30) | (desc << 14) | offs_e[None, :]
            else:
                bits = s.to(tl.float32).to(tl.int32, bitcast=True)
                wide = bits.to(tl.int64)
                desc = tl.where(bits < 0, wide + 4294967296, 2147483647 - wide)
                key = (load.to(tl.int64) << 48) | (desc << 16) | offs_e[None, :].to(tl.int64)
            key = tl.where(e_ok[None, :], key, BIG)  # [RB, BLOCK_E], unique per row
            best = BIG - tl.topk(BIG - key, KP, dim=1)  # [RB, KP] ascending keys = pick order
            kth = tl.max(tl.where(offs_k[None, :] < K, best, -1), axis=1)  # [RB] k-th smallest key
            load += (key <= kth[:, None]).to(load.dtype)  # exactly the k picks
            ids = (best & (0x3FFF if SCORE16 else 0xFFFF)).to(tl.int32)  # [RB, KP]
            tl.store(out_ptr + tok[:, None].to(tl.int64) * K + offs_k[None, :], ids,
                     mask=t_ok[:, None] & (offs_k[None, :] < K))


def greedy_balanced_triton(router_logits: torch.Tensor, top_k: int, rounds_per_program: int = 1, num_warps: int | None = None) -> torch.Tensor:
    """[N, E] router scores -> [N, k] int32 ids (LightLLM's rule, router-score tie-breaks)."""
    n, num_experts = router_logits.shape
    if num_experts >= 1 << 16:
        raise ValueError(f"greedy_balanced supports up to 65535 experts, got {num_experts}")
    out = torch.empty(n, top_k, dtype=torch.int32, device=router_logits.device)
    if n == 0:
        return out
    scores = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    score16 = scores.dtype in (torch.bfloat16, torch.float16) and num_experts < 1 << 14
    tokens_per_round = lcm(num_experts, top_k) // top_k
    rounds = -(-n // tokens_per_round)
    block_e = triton.next_power_of_2(num_experts)
    grid = (-(-rounds // rounds_per_program),)
    _greedy_balanced_kernel[grid](
        scores, out, n, scores.stride(0),
        E=num_experts, K=top_k, KP=max(2, triton.next_power_of_2(top_k)), T=tokens_per_round,
        BLOCK_E=block_e, RB=rounds_per_program, SCORE16=score16,
        num_warps=num_warps or 4,
    )
    return out
