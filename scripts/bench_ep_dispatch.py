"""Per-step time of the EP dispatch paths, all measured in one run, repeats interleaved.

For each --ep size N (one process per GPU, NCCL; --device cpu: gloo, a smoke run) the ranks
time, in one run (server/bench/dispatch_paths.py):
  decode   B sequences in total (B/N per rank), one token each, context L + step, CUDA graphs:
           local (ep 1) / 1gpu (ep > 1: rank 0 alone, the whole model, local path) as the
           baseline, allgather (the fixed-capacity EP path; at ep 1 forced over a size-1 group),
           alltoall (the variable-split path, eager: a host sync per layer)
  prefill  --prefill-tokens T per rank in prompts of L, eager: allgather vs alltoall, the
           choice parallel.dispatch=auto makes by size (server/moe/dispatch/size_routed.py)
With --fp8-wire both phases also time allgather_fp8: the fixed-capacity path with FP8 rows on
the all-gather (parallel.dispatch_wire=fp8: e4m3 codes and a float32 scale per 128 channels),
reported against allgather's bf16 rows in the same run, with each wire's bytes per token row.
Each figure is the median over --repeats of a timed block of --steps steps; ratios are taken
per repeat (paths alternate inside a repeat), then their median; spread = (max - min) / median
of the repeats. Ranks report the slowest rank. With several --ep sizes a last table puts the
allgather decode tok/s of every size side by side against one GPU's (ep 1's local path) and
the targets. NVLink multicast stays off.

  python scripts/bench_ep_dispatch.py --batch 128 8                 # one GPU: allgather vs local
  python scripts/bench_ep_dispatch.py --ep 1 2 4 8 --batch 128 8    # every size this machine has
  python scripts/bench_ep_dispatch.py --ep 2 4 8 --batch 128 8 --fp8-wire  # fp8 vs bf16 rows on the wire
  python scripts/bench_ep_dispatch.py --device cpu --model tiny --ep 1 2 --batch 4 --steps 2 \
      --repeats 2 --prefill-tokens 32 --input-len 8                  # CPU smoke (no graphs)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: decode tok/s of the allgather path at B=128 as a multiple of one GPU's, per EP size
TOK_S_TARGETS = {2: 1.3, 4: 2.2, 8: 3.5}


def report(args, ranks: list[dict], world: int) -> dict:
    med = statistics.median
    doc = {"command": " ".join(sys.argv), "ep": world, "model": args.model, "layers": args.layers,
           "routing": args.routing, "steps": args.steps, "repeats": args.repeats, "device": device_name(args),
           "date": time.strftime("%Y-%m-%d"), "decode": {}, "prefill": None}
    doc["wire_bytes"] = ranks[0]["wire_bytes"]
    wires = ", ".join(f"{w} {b} B" for w, b in doc["wire_bytes"].items())
    lines = [f"## EP dispatch, ep {world}, {doc['device']}, {args.model} ({args.layers} layers), routing={args.routing}",
             f"all-gather bytes per token row: {wires}",
             "", "| phase | batch | path | graphs | ms / step | tok/s | spread | vs baseline (median of per-repeat ratios) |",
             "|---|---|---|---|---|---|---|---|"]
    for batch, entry in ranks[0]["decode"].items():
        names = list(entry["seconds"])
        slowest = {n: [max(r["decode"][batch]["seconds"][n][i] for r in ranks if n in r["decode"][batch]["seconds"])
                       for i in range(args.repeats)] for n in names}
        base = "local" if world == 1 else "1gpu"
        rows = {}
        for n in names:
            step_ms = med(slowest[n]) / args.steps * 1e3
            ratio = med([t / b for t, b in zip(slowest[n], slowest[base])])
            spread = (max(slowest[n]) - min(slowest[n])) / med(slowest[n])
            rows[n] = {"step_ms": step_ms, "tok_s": batch / (step_ms / 1e3), "time_vs_" + base: ratio,
                       "spread": spread, "graphs": entry["graphs"][n], "repeats_s": slowest[n]}
            vs_bf16 = ""
            if n == "allgather_fp8":
                rows[n]["time_vs_allgather"] = med([t / b for t, b in zip(slowest[n], slowest["allgather"])])
                vs_bf16 = f"; x{rows[n]['time_vs_allgather']:.3f} of allgather (bf16 wire)"
            lines.append(f"| decode | {batch} | {n} | {rows[n]['graphs']} | {step_ms:.3f} | {rows[n]['tok_s']:.0f} | "
                         f"{spread:.1%} | time x{ratio:.3f} of {base} (tok/s x{1 / ratio:.2f}){vs_bf16} |")
        doc["decode"][batch] = rows
    if ranks[0]["prefill"]:
        secs = {n: [max(r["prefill"]["seconds"][n][i] for r in ranks) for i in range(args.repeats)]
                for n in ranks[0]["prefill"]["seconds"]}
        tokens = max(1, args.prefill_tokens // args.input_len) * args.input_len * world
        doc["prefill"] = {}
        for n, xs in secs.items():
            ratio = med([t / b for t, b in zip(xs, secs["alltoall"])])
            doc["prefill"][n] = {"step_ms": med(xs) * 1e3, "tok_s": tokens / med(xs), "time_vs_alltoall": ratio,
                                 "repeats_s": xs}
            spread = (max(xs) - min(xs)) / med(xs)
            vs_bf16 = ""
            if n == "allgather_fp8":
                doc["prefill"][n]["time_vs_allgather"] = med([t / b for t, b in zip(xs, secs["allgather"])])
                vs_bf16 = f"; x{doc['prefill'][n]['time_vs_allgather']:.3f} of allgather (bf16 wire)"
            lines.append(f"| prefill | {tokens} tok | {n} | False | {med(xs) * 1e3:.3f} | {tokens / med(xs):.0f} | "
                         f"{spread:.1%} | time x{ratio:.3f} of alltoall{vs_bf16} |")
    print("\n".join(lines))
    return doc


def device_name(args) -> str:
    if args.device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return "cpu"


def rank_main(rank: int, world: int, port: int, args, out: str) -> None:
    from server.bench.dispatch_paths import measure

    os.environ.update(NO_MULTICAST)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            **({"device_id": device} if device.type == "cuda" else {}))
    ctrl = dist.new_group(backend="gloo") if world > 1 else None
    try:
        mine = measure(args, rank, world, device, ctrl)
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, mine, group=ctrl)
        else:
            gathered = [mine]
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def sweep_table(docs: dict[int, dict]) -> str:
    """Every EP size's allgather decode rate against one GPU's: ep 1's local path (a separate
    run) and the same run's 1gpu (rank 0 alone, timed right after the EP paths)."""
    base = docs.get(1)
    lines = ["", "## Decode tok/s by EP size (allgather, CUDA graphs where captured)", "",
             "| batch | ep | tok/s | vs one GPU (ep 1 local) | vs same-run 1gpu | spread | target |",
             "|---|---|---|---|---|---|---|"]
    for batch in docs[min(docs)]["decode"]:
        for ep, doc in sorted(docs.items()):
            row = doc["decode"][batch]["allgather"]
            ref = doc["decode"][batch].get("1gpu") or doc["decode"][batch].get("local")
            one = base["decode"][batch]["local"]["tok_s"] if base else None
            vs_one = f"x{row['tok_s'] / one:.2f}" if one else "-"
            if ep == 1:
                target = f"step <= 1.15x local: {'met' if row['time_vs_local'] <= 1.15 else 'MISSED'}" if batch == 128 else "-"
            elif batch == 128 and ep in TOK_S_TARGETS:
                target = f">= x{TOK_S_TARGETS[ep]}: {'met' if row['tok_s'] >= TOK_S_TARGETS[ep] * ref['tok_s'] else 'MISSED'}"
            elif batch == 8:
                target = f"step <= 2x 1gpu: {'met' if row['step_ms'] <= 2 * ref['step_ms'] else 'MISSED'}"
            else:
                target = "-"
            lines.append(f"| {batch} | {ep} | {row['tok_s']:.0f} | {vs_one} | x{row['tok_s'] / ref['tok_s']:.2f} | "
                         f"{row['spread']:.1%} | {target} |")
    return "\n".join(lines)


def run_size(args, ep: int) -> dict:
    """Spawn `ep` ranks (in-process at ep 1), time every path, return the report document."""
    from server.worker.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ranks.pt")
        port = free_port("127.0.0.1")
        if ep == 1:
            rank_main(0, 1, port, args, out)
        else:
            import torch.multiprocessing as mp

            mp.spawn(rank_main, args=(ep, port, args, out), nprocs=ep, join=True)
        ranks = torch.load(out, weights_only=False)
    return report(args, ranks, ep)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, nargs="+", default=[1],
                   help="EP sizes, one GPU per rank, run one after the other (1: the forced EP path vs local)")
    p.add_argument("--batch", type=int, nargs="+", default=[128, 8], help="decode batch in total (split over ranks)")
    p.add_argument("--model", default="qwen3_30b_a3b", help="conf/model/<name>.yaml (random weights), or tiny")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--routing", default="natural", help="a registered routing policy name")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed block")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--prefill-tokens", type=int, default=4096, help="per rank (0: skip prefill)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--fp8-wire", action="store_true",
                   help="also time allgather_fp8: FP8 rows on the all-gather (parallel.dispatch_wire=fp8) vs the bf16 wire")
    p.add_argument("--json", type=Path, help="write the results here (one document per EP size)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA GPU (use --device cpu for a smoke run)")
    gpus = torch.cuda.device_count() if args.device == "cuda" else None
    sizes = []
    for ep in args.ep:
        bad = [b for b in args.batch if b % ep]
        if bad:
            p.error(f"--batch {bad} does not split over --ep {ep}")
        if gpus is not None and ep > gpus:
            print(f"skipping --ep {ep}: this machine has {gpus} GPUs", file=sys.stderr)
            continue
        sizes.append(ep)
    os.environ.update(NO_MULTICAST)
    docs = {}
    for ep in sizes:
        docs[ep] = run_size(args, ep)
    if len(docs) > 1:
        print(sweep_table(docs))
    if args.json:
        args.json.write_text(json.dumps({str(ep): doc for ep, doc in docs.items()}, indent=2))


if __name__ == "__main__":
    main()
