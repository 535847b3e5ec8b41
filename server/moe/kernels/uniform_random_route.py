"""Triton kernel for `uniform_random`: the hashed scores and their top-k in one pass.

Same function as the torch path in `server.moe.routing.uniform_random` (same counter hash, same
(score << 16 | expert) keys, top-k sorted descending), so ids are identical. The torch path
materialises an [N, E] int64 score matrix through a dozen elementwise kernels and a topk:
~300 µs per call at N=8192, E=256 on an H100, which would distort the very step times the
policy is meant to compare. Here each program hashes a block of rows in registers and keeps
their k best with a bitonic top-k: one launch, no [N, E] tensor, graph-capturable (the token
offset may be a 0-d device tensor read at run time).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the torch path
    triton = None


if triton is not None:

    @triton.jit
    def _mix32(x):
        """`server.moe.routing.hashing.mix32` on int64 values (products stay below 2**63)."""
        x = x & 0xFFFFFFFF
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
        x = x ^ (x >> 16)
        return x

    @triton.jit(do_not_specialize=["n_tokens", "token_offset", "key"])  # per step / per layer values
    def _uniform_random_kernel(
        out_ptr,  # [N, K] int32
        offset_ptr,  # [1] int64 token offset (when OFFSET_FROM_PTR)
        n_tokens,
        token_offset,  # int token offset (otherwise)
        key,  # 32-bit stream key (seed, layer)
        E: tl.constexpr,
        K: tl.constexpr,
        KP: tl.constexpr,  # next power of two >= max(K, 2)
        BLOCK_E: tl.constexpr,  # next power of two >= E
        BLOCK_N: tl.constexpr,
        OFFSET_FROM_PTR: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        if OFFSET_FROM_PTR:
            base = tl.load(offset_ptr).to(tl.int64)
        else:
            base = token_offset.to(tl.int64)
        token = rows.to(tl.int64) + base  # [BLOCK_N] global token index
        expert = tl.arange(0, BLOCK_E).to(tl.int64)  # [BLOCK_E]
        row_hash = _mix32(token * 0x3C6EF372 + key)  # [BLOCK_N]
        h = _mix32(row_hash[:, None] ^ (expert * 0x1B873593)[None, :])  # [BLOCK_N, BLOCK_E]
        score = tl.where((expert < E)[None, :], (h << 16) | expert[None, :], -1)  # unique per row
        best = tl.topk(score, KP, dim=1)  # [BLOCK_N, KP] descending
        ids = (best & 0xFFFF).to(tl.int32)
        offs_k = tl.arange(0, KP)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :], ids,
                 mask=(rows < n_tokens)[:, None] & (offs_k < K)[None, :])


def triton_available() -> bool:
    return triton is not None


def uniform_random_triton(n: int, num_experts: int, top_k: int, key: int, token_offset, device: torch.device) -> torch.Tensor:
    """[N, k] int32 ids: the k largest hashed scores per token (see the module docstring).
    `key` is a 32-bit stream key (`hashing.stream_key`)."""
    out = torch.empty(n, top_k, dtype=torch.int32, device=device)
    if n == 0:
        return out
    from_ptr = isinstance(token_offset, torch.Tensor)
    offset_ptr = token_offset.reshape(1).to(torch.int64) if from_ptr else out  # any pointer when unused
    block_n = 16
    _uniform_random_kernel[(-(-n // block_n),)](
        out, offset_ptr, n, 0 if from_ptr else int(token_offset), key,
        E=num_experts, K=top_k, KP=max(2, triton.next_power_of_2(top_k)),
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_N=block_n, OFFSET_FROM_PTR=from_ptr,
        num_warps=4,
    )
    return out
