#!/usr/bin/env python3
"""Times two sources of the greedy_balanced CUDA kernel in one process (GPU only).

    git show HEAD:server/moe/kernels/greedy_route.cu > old_greedy_route.cu
    python scripts/compare_greedy_kernels.py --baseline old_greedy_route.cu [--variant NAME=DEFINES]

Compiles server/moe/kernels/greedy_route.cu (the candidate), the baseline source and any
`--variant` (the candidate with extra #defines, e.g. 'after=CHAIN_AFTER_RANKING 1') for E=256,
k=8, checks each against the torch path on several score distributions, then prints eager and
CUDA-graph-replay microseconds per call at each N, every kernel measured alternately in the same
run (best of two). A kernel change is judged against the kernel it replaces on the same GPU in
the same process, not against an older log.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.moe.kernels import greedy_route_cuda as g  # noqa: E402
from server.moe.routing.greedy import greedy_balanced_torch  # noqa: E402
from scripts.bench_policies import time_eager, time_graph  # noqa: E402  (the policy table's timers)


def define_lines(spec: str) -> str:
    """'A 1;B' (a --variant's defines) -> '#define A 1\n#define B\n'."""
    return "".join(f"#define {d.strip()}\n" for d in spec.split(";") if d.strip())


def build(source: str, e: int, k: int, smem: int, prework_warps: int = g.PREWORK_WARPS) -> g._Launcher:
    defines = g.kernel_defines(e, k, min(e // k, prework_warps), smem)
    kernel = torch.cuda._compile_kernel(defines + source, "greedy_rounds")
    launcher = g._Launcher(kernel, e, k, torch.cuda.current_device(), prework_warps)
    launcher.shared_bytes = smem
    kernel.set_shared_memory_config(smem)
    return launcher


def scores_for(kind: str, n: int, e: int) -> torch.Tensor:
    x = torch.randn(n, e, device="cuda")
    if kind == "biased":
        x = x + torch.linspace(-3, 3, e, device="cuda")
    if kind == "ties":
        x = torch.round(x * 2) / 2
    if kind == "wide":
        x = x * 100
    return x.to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--baseline-smem", type=int, default=0,
                    help="dynamic shared memory for the baseline (default: the candidate's); a baseline whose "
                         "struct Smem is larger fails its static_assert at compile time and says so")
    ap.add_argument("--baseline-warps", type=int, default=g.PREWORK_WARPS,
                    help="prework warps the baseline source was written for (sessions 1-4 kernels: 16)")
    ap.add_argument("--n", type=int, nargs="+", default=[128, 8192])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DEFINES",
                    help="also time the candidate source with extra #defines, e.g. 'after=CHAIN_AFTER_RANKING 1'; "
                         "NAME@W=... builds it with W prework warps")
    args = ap.parse_args()
    e, k = 256, 8
    warps = min(e // k, g.PREWORK_WARPS)
    smem = g.shared_bytes(e, k, warps)
    base_smem = args.baseline_smem or max(smem, g.shared_bytes(e, k, min(e // k, args.baseline_warps)))
    variants = {"baseline": build(args.baseline.read_text(), e, k, base_smem, args.baseline_warps),
                "candidate": build(g.CUDA_SOURCE, e, k, smem)}
    for spec in args.variant:
        name, _, defines = spec.partition("=")
        name, _, np_ = name.partition("@")  # NAME@W: W prework warps
        w = int(np_) if np_ else g.PREWORK_WARPS
        variants[name] = build(define_lines(defines) + g.CUDA_SOURCE, e, k, g.shared_bytes(e, k, min(e // k, w)), w)
    for name, launch in variants.items():
        for kind in ("randn", "biased", "ties", "wide"):
            for n in (1, 20, 31, 8192):
                s = scores_for(kind, n, e)
                out = torch.empty(n, k, dtype=torch.int32, device="cuda")
                launch(s, out)
                torch.cuda.synchronize()
                assert torch.equal(out.cpu(), greedy_balanced_torch(s.cpu(), k)), (name, kind, n)
        print(f"{name}: ids == torch path (randn, biased, ties, wide; N = 1, 20, 31, 8192)")
    print(f"device: {torch.cuda.get_device_name()}  E={e} k={k} bf16; µs per call, median of 5 x 200 "
          "(bench_policies.py's timers)")
    print("| kernel | scores | N | eager | graph |\n|---|---|---:|---:|---:|")
    for kind in ("randn", "biased"):
        for n in args.n:
            s = scores_for(kind, n, e)
            out = torch.empty(n, k, dtype=torch.int32, device="cuda")
            rows = {}
            for rep in range(2):  # alternate, keep the better of two
                for name, launch in variants.items():
                    call = lambda: launch(s, out)  # noqa: E731
                    t = (1e6 * time_eager(call, "cuda", 200), 1e6 * time_graph(call, 200))
                    rows[name] = t if name not in rows else tuple(map(min, rows[name], t))
            for name, (eager, graph) in rows.items():
                print(f"| {name} | {kind} | {n} | {eager:.1f} | {graph:.1f} |")


if __name__ == "__main__":
    main()
