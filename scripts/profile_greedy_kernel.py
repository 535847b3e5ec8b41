#!/usr/bin/env python3
"""Where the greedy_balanced CUDA kernel spends its time (GPU only; numbers in BENCHMARKS.md §3).

    python scripts/profile_greedy_kernel.py

Compiles server/moe/kernels/greedy_route.cu with `#define PROFILE` (clock64 stamps per round)
for E=256, k=8, runs it on N router-score rows and prints, in SM cycles from the round's start
(median over rounds): when each half of the tokens is ranked, when the chain is through each half,
when the list phase is done and when the last (<= 32 experts left) tokens are done. At large N
it also prints the spread of the round's end over rounds (the slowest round sets the kernel's
time), split by whether a list-phase token needed a second ballot or exact reductions (from a
CPU replay of the rule), and the SM clock under load, to turn cycles into microseconds. Variant
`chain after all ranking` (CHAIN_AFTER_RANKING) starts the chain only once every list is
ranked, so its chain times are the chain alone, without the ranking warps competing for issue
slots. `--variant NAME=DEFINES` profiles other builds instead (timing probes; their ids are not
checked). Checks the ids against the torch path first. (No stamp is taken right after a
barrier: the clock read there is not held back by BAR.SYNC.DEFER_BLOCKING and reads early.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.moe.kernels import greedy_route_cuda as g  # noqa: E402
from server.moe.routing.greedy import greedy_balanced_torch  # noqa: E402
from scripts.compare_greedy_kernels import define_lines  # noqa: E402
from scripts.ubench_graph_overhead import sm_clock_ghz  # noqa: E402

E, K = 256, 8
T, NP = E // K, min(E // K, g.PREWORK_WARPS)
NB = -(-T // NP)  # halves of the round: NP tokens each
SMEM = g.shared_bytes(E, K, NP)
BASE = g.kernel_defines(E, K, NP, SMEM) + "#define PROFILE 1\n"
ROW = 5 + T  # the kernel's PROF_ROW: start, per token ranked, list phase done, round done, per half chained


def list_depths(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per round and list-phase token: how deep into its ranked list its last pick lies, and how
    long that list is (experts within WINDOW codes of its best) -- [R, FAST] each, on the CPU."""
    x = scores.cpu()
    n = x.shape[0] // T * T
    w = x[:n].view(torch.int16).to(torch.int32) & 0xFFFF
    code = w ^ (0x8000 | (((w >> 15) & 1) * 0x7FFF))  # [n, E] the kernel's ordered codes
    fast = (E - 32 + K - 1) // K
    key = (code << 8) | (255 - torch.arange(E))  # higher = earlier in the list
    rank = key.argsort(1, descending=True).argsort(1)  # [n, E] list position of each expert
    picks = greedy_balanced_torch(x[:n], K).long()  # [n, k]
    depth = rank.gather(1, picks).max(1).values + 1  # [n]
    listed = (code > code.max(1, keepdim=True).values - 255).sum(1)  # [n] WINDOW = 255
    return depth.view(-1, T)[:, :fast], listed.view(-1, T)[:, :fast]


def print_round_spread(scores: torch.Tensor, done: torch.Tensor) -> None:
    """Round-done cycles over rounds, split by whether a list-phase token ran past its list (exact
    reductions) or past 32 positions (a second ballot): the slowest rounds set the kernel's time."""
    depth, listed = list_depths(scores)
    done = done[: depth.shape[0]]
    reduction = (depth > listed).any(1)
    second = (depth > 32).any(1) & ~reduction

    def q(t: torch.Tensor) -> str:
        return f"p50 {int(t.median())} p90 {int(t.quantile(0.9))} max {int(t.max())}" if t.numel() else "-"

    print(f"    round done over {done.numel()} rounds: {q(done)}")
    print(f"    rounds with exact reductions ({int(reduction.sum())}): {q(done[reduction])}")
    print(f"    rounds with a second ballot only ({int(second.sum())}): {q(done[second])}")
    print(f"    rounds with one ballot per token ({int((~reduction & ~second).sum())}): {q(done[~reduction & ~second])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DEFINES",
                    help="profile only these variants (#defines separated by ';'); ids are not checked for them, "
                         "so timing probes that change the result can run")
    args = ap.parse_args()
    print(f"SM clock under a spin load: {sm_clock_ghz():.3f} GHz")
    variants = {"default": "", "chain after all ranking": "#define CHAIN_AFTER_RANKING 1\n"}
    if args.variant:
        variants = {}
        for spec in args.variant:
            name, _, defines = spec.partition("=")
            variants[name] = define_lines(defines)
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
            prof = torch.zeros(rounds, ROW, dtype=torch.int64, device="cuda")
            for _ in range(3):
                kernel(grid=(rounds, 1, 1), block=(32 * (NP + 1), 1, 1), args=[scores, out, n, scores.stride(0), prof], shared_mem=SMEM)
            torch.cuda.synchronize()
            if not args.variant:
                assert torch.equal(out.cpu(), greedy_balanced_torch(scores.cpu(), K))
            rel_all = (prof - prof[:, :1]).float().cpu()  # [rounds, ROW] cycles since start
            rel = rel_all.median(0).values
            ready = " / ".join(str(int(rel[1 + b * NP:1 + min(T, (b + 1) * NP)].max())) for b in range(NB))
            chained = " / ".join(str(int(rel[3 + T + b])) for b in range(NB))
            print(f"  {label}, N={n}: halves ranked {ready} | chain through halves {chained} | "
                  f"list phase done {int(rel[1 + T])} | round done {int(rel[2 + T])}  (SM cycles)")
            if n >= 1024:
                print_round_spread(scores, rel_all[:, 2 + T])


if __name__ == "__main__":
    main()
