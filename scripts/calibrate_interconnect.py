"""Measure the collectives the EP dispatch issues and write an interconnect profile for the
EP what-if (`bench.interconnect=<the file>`).

    python scripts/calibrate_interconnect.py --out gpu_out/interconnect.yaml          # every GPU here
    torchrun --nnodes 2 --nproc-per-node 8 ... scripts/calibrate_interconnect.py --out x.yaml  # two nodes

For each collective of server/bench/whatif/wire.py (all_gather_into_tensor, all_to_all_single)
and message sizes from 4 KiB to --max-mb, every rank times `--reps` calls with CUDA events
after a warm-up; a size's time is the median of its slowest rank. The profile's latency is
the fitted intercept and its bus bandwidth the fitted slope of t = latency + (N-1)/N * bytes /
bus_bw (least squares of the relative error over the sizes, nccl-tests' byte conventions). Across nodes (torchrun
with WORLD_SIZE > LOCAL_WORLD_SIZE) the whole group is fitted to the `inter` model and one
node's ranks to the `intra` one. With one GPU there is nothing to measure: the script says
so and exits 0. `--backend gloo --device cpu` runs the same code on CPU processes (a smoke
test of the script; those numbers describe no GPU interconnect).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _time_one(name: str, nbytes: int, group, device: torch.device, reps: int) -> float:
    """Median seconds of one collective of `nbytes` (output bytes for all_gather, buffer bytes
    for all_to_all) on this rank."""
    n = dist.get_world_size(group)
    elems = max(n, nbytes // 2 // n * n)  # bf16 elements, a multiple of n
    out = torch.empty(elems, dtype=torch.bfloat16, device=device)
    inp = torch.ones(elems // n if name == "all_gather" else elems, dtype=torch.bfloat16, device=device)
    call = (lambda: _gather(out, inp, group=group)) if name == "all_gather" else (
        lambda: dist.all_to_all_single(out, inp, group=group))
    for _ in range(3):
        call()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sweep(group, device, sizes: list[int], reps: int) -> dict[str, list[float]]:
    """{collective: [seconds per size]}: each size's slowest rank (a max all-reduce)."""
    out = {}
    for name in ("all_gather", "all_to_all"):
        row = []
        for size in sizes:
            t = torch.tensor([_time_one(name, size, group, device, reps)], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            row.append(float(t.item()))
        out[name] = row
    return out


def fit(sizes: list[int], seconds: list[float], ranks: int, share: float | None = None) -> dict:
    """Least-squares t = latency + x * bytes / bw with x = (N-1)/N (or `share`) -> {latency_us, bus_bw_gbps}."""
    x = np.array(sizes, dtype=np.float64) * (share if share is not None else (ranks - 1) / ranks)
    t = np.array(seconds, dtype=np.float64)
    a = np.vstack([np.ones_like(x), x]).T / t[:, None]  # relative residuals: small sizes count as much as large
    (latency, per_byte), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    per_byte = max(per_byte, 1e-15)
    return {"latency_us": round(float(max(latency, 0.0)) * 1e6, 2), "bus_bw_gbps": round(float(1.0 / per_byte / 1e9), 2)}


def _rank(rank: int, world: int, local: int, args, port: int) -> None:
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank % max(torch.cuda.device_count(), 1)}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if port:
        dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    else:
        dist.init_process_group(args.backend)
    sizes = [4096 << i for i in range(64) if (4096 << i) <= args.max_mb << 20]
    node_group = None
    if world > local:  # one node's ranks, for the intra fit (every rank joins every new_group call)
        for first in range(0, world, local):
            g = dist.new_group(list(range(first, first + local)))
            if first <= rank < first + local:
                node_group = g
    whole = _sweep(None, device, sizes, args.reps)
    intra = _sweep(node_group, device, sizes, args.reps) if node_group is not None else whole
    if rank == 0:
        profile = {"name": Path(args.out).stem, "gpus_per_node": local,
                   "intra": {c: fit(sizes, intra[c], local) for c in intra}}
        if world > local:
            profile["inter"] = {c: fit(sizes, whole[c], world, share=(world - local) / world) for c in whole}
        what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU processes (gloo)"
        head = (f"# Measured by scripts/calibrate_interconnect.py on {datetime.date.today()}: {world} ranks of {what}, "
                f"{local} per node, {args.backend}.\n# sizes (bytes): {sizes}\n"
                + "".join(f"# {c} seconds (slowest rank, median of {args.reps}): {[round(t, 7) for t in whole[c]]}\n"
                          for c in whole))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(head + yaml.safe_dump(profile, sort_keys=False))
        print(f"wrote {args.out}:\n{yaml.safe_dump(profile, sort_keys=False)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="profile to write (YAML)")
    p.add_argument("--gpus", type=int, default=0, help="ranks to spawn on this machine (0: every GPU)")
    p.add_argument("--max-mb", type=int, default=256, help="largest message, MiB")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--backend", default="nccl", choices=("nccl", "gloo"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = p.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun
        _rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
              int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])), args, 0)
        return 0
    ranks = args.gpus or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if ranks < 2:
        print(f"{ranks} GPU here: nothing to measure (a collective needs two ranks). The what-if uses a shipped "
              "profile (conf/interconnect/*.yaml) until this runs where several GPUs are.", flush=True)
        return 0
    from server.worker.rendezvous import free_port

    mp.spawn(_rank, args=(ranks, ranks, args, free_port("127.0.0.1")), nprocs=ranks, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
