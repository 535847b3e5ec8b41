#!/usr/bin/env python3
"""Where the greedy_balanced CUDA kernel spends its time (GPU only; numbers in BENCHMARKS.md §3).

    python scripts/profile_greedy_kernel.py

Compiles server/moe/kernels/greedy_route.cu with `#define PROFILE` (clock64 stamps per round)
for E=256, k=8, runs it on N router-score rows and prints, in SM cycles from the round's start
(median over rounds): when the first and second half of the round's ranked lists are ready,
when the chain is through the first half of the tokens and through the list phase, and when the
last (<= 32 experts left) tokens are done. Variant `chain after all ranking`
(CHAIN_AFTER_RANKING) starts the chain only once every list is ranked, so its first-half time is
the chain alone, without the ranking warps competing for issue slots. Checks the ids against
the torch path first. (No stamp is taken right after a barrier: the clock read there is not
held back by BAR.SYNC.DEFER_BLOCKING and reads early.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.moe.kernels import greedy_route_cuda as g  # noqa: E402
from server.moe.routing.greedy import greedy_balanced_torch  # noqa: E402

E, K = 256, 8
T, NP = E // K, min(E // K, g.PREWORK_WARPS)
SMEM = g.shared_bytes(E, K, NP)
BASE = f"#define NE {E}\n#define NK {K}\n#define NT {T}\n#define NP {NP}\n#define SMEM_BYTES {SMEM}\n#define PROFILE 1\n#define VEC 1\n"
PHASES = {4 + 2 * NP: "first-half tokens done", 1 + 2 * NP: "list phase done", 2 + 2 * NP: "round done"}


def main() -> None:
    variants = {"default": "", "chain after all ranking": "#define CHAIN_AFTER_RANKING 1\n"}
    for variant, extra in variants.items():
        kernel = torch.cuda._compile_kernel(BASE + extra + g.CUDA_SOURCE, "greedy_rounds")
        kernel.set_shared_memory_config(SMEM)
        print("variant", variant)
        for label, n in [("randn", 8192), ("randn", 128), ("randn + expert bias", 8192)]:
            x = torch.randn(n, E, device="cuda")
            if "bias" in label:
                x = x + torch.linspace(-3, 3, E, device="cuda")
            scores = x.to(torch.bfloat16)
            rounds = -(-n // T)
            out = torch.empty(n, K, dtype=torch.int32, device="cuda")
            prof = torch.zeros(rounds, 1 + 2 * NP + T, dtype=torch.int64, device="cuda")
            for _ in range(3):
                kernel(grid=(rounds, 1, 1), block=(32 * (NP + 1), 1, 1), args=[scores, out, n, scores.stride(0), prof], shared_mem=SMEM)
            torch.cuda.synchronize()
            assert torch.equal(out.cpu(), greedy_balanced_torch(scores.cpu(), K))
            rel = (prof - prof[:, :1]).float().cpu().median(0).values  # [1 + 2 NP + T] cycles since start
            first, second = int(rel[1:1 + NP].max()), int(rel[1 + NP:1 + 2 * NP].max())
            phases = " | ".join(f"{name} {int(rel[i])}" for i, name in PHASES.items())
            print(f"  {label}, N={n}: lists ready {first} / {second} | {phases}  (SM cycles)")


if __name__ == "__main__":
    main()
