#!/usr/bin/env python3
"""Where the greedy_balanced CUDA kernel's warps stall, per SASS instruction (GPU with ncu).

Profile (one launch at N=8192, E=256, k=8, bf16 random scores; the third launch is captured):

    ncu --clock-control none --section SourceCounters --section WarpStateStats \
        --warp-sampling-interval 0 -k regex:greedy -s 2 -c 1 -o prof python3 scripts/ncu_greedy_kernel.py
    ncu --import prof.ncu-rep --page source --csv --print-source sass > source.csv

then summarise here (no GPU needed): samples and executed warp instructions per
barrier-delimited region, and per instruction with its top stall reasons for the SASS index
range given:

    python scripts/ncu_greedy_kernel.py --view source.csv 37 84

The issue floor (warp instructions on the busiest scheduler, one issue per cycle each):

    ncu --clock-control none --metrics smsp__inst_executed.sum,smsp__inst_executed.max,\
        sm__cycles_elapsed.max,smsp__issue_active.avg.pct_of_peak_sustained_elapsed \
        -k regex:greedy -s 2 -c 1 python3 scripts/ncu_greedy_kernel.py
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def launch() -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from server.moe.kernels.greedy_route_cuda import greedy_balanced_cuda

    scores = torch.randn(8192, 256, device="cuda").to(torch.bfloat16)
    for _ in range(3):
        greedy_balanced_cuda(scores, 8)
    torch.cuda.synchronize()


def view(path: Path, first: int, last: int) -> None:
    rows = list(csv.reader(path.open()))
    header, data = rows[1], rows[2:]
    col = {h: i for i, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]

    def samples(r: list[str]) -> int:
        return int(r[col["Warp Stall Sampling (All Samples)"]] or 0)

    def executed(r: list[str]) -> int:
        return int(r[col["Instructions Executed"]] or 0)

    total = sum(executed(r) for r in data)
    print("total samples", sum(samples(r) for r in data), "| warp instructions executed", total)
    marks = [i for i, r in enumerate(data) if "BAR" in r[1] or "EXIT" in r[1]] + [len(data)]
    start = 0
    for m in marks:  # regions end at barriers and exits: which role runs a region is read from the SASS
        label = data[m][1].strip()[:40] if m < len(data) else "(end)"
        n = sum(executed(r) for r in data[start:m])
        print(f"region {start}-{m}: {sum(samples(r) for r in data[start:m])} samples, "
              f"{n} warp instructions ({100 * n / max(total, 1):.1f}%), up to {label}")
        start = m
    for i in range(first, min(last, len(data))):
        r = data[i]
        top = sorted(((int(r[col[h]] or 0), h[6:]) for h in reasons), reverse=True)[:3]
        stalls = " ".join(f"{name}:{n}" for n, name in top if n)
        print(f"{i:5d} {r[1].strip()[:58]:58s} {samples(r):5d} ex={r[col['Instructions Executed']]:>6s} {stalls}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--view", nargs=3, metavar=("CSV", "FIRST", "LAST"), help="summarise an exported source page")
    args = ap.parse_args()
    if args.view:
        view(Path(args.view[0]), int(args.view[1]), int(args.view[2]))
    else:
        launch()
