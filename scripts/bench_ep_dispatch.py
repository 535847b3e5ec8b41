"""Per-step time of the EP dispatch paths, all measured in one run, repeats interleaved.

One process per GPU (--ep N spawns N ranks, NCCL; --device cpu: gloo, for a smoke run). One
model per rank; its dispatcher is swapped between paths (same weights, same inputs, same KV
cache), and each path's decode graphs are captured with its own dispatcher inside.

  decode   B sequences in total (B/N per rank), one token each, context L + step:
           local      the ep_size 1 path (ep 1 only): fused MoE, no communication
           allgather  the fixed-capacity EP path (graph-safe; at ep 1 over a size-1 group)
           alltoall   the variable-split path (a host sync per layer: eager only)
           1gpu       (ep > 1) rank 0 alone, the whole model, local path at B: one GPU's rate
  prefill  --prefill-tokens T per rank in prompts of L, eager: allgather vs alltoall, the
           choice parallel.dispatch=auto makes by size (server/moe/dispatch/size_routed.py)

Each figure is the median over --repeats of a timed block of --steps steps (a host sync per
step, as a server needs its tokens); ratios are taken per repeat (paths alternate inside a
repeat), then their median. Ranks report the slowest rank. NVLink multicast stays off.

  python scripts/bench_ep_dispatch.py --batch 128 8                     # one GPU: allgather vs local
  python scripts/bench_ep_dispatch.py --ep 2 --batch 128 8              # 2 GPUs (also --ep 4, --ep 8)
  python scripts/bench_ep_dispatch.py --device cpu --model tiny --ep 2 --batch 4 --steps 2 --repeats 2 \
      --prefill-tokens 32 --input-len 8                                  # CPU smoke (no graphs)
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


def model_config(args):
    from server.config import ModelConfig

    if args.model == "tiny":
        return ModelConfig()
    import yaml

    cfg = yaml.safe_load((ROOT / "conf" / "model" / f"{args.model}.yaml").read_text())
    cfg["shape"]["num_hidden_layers"] = args.layers
    return ModelConfig(name=cfg["name"], shape=cfg["shape"], dtype=cfg.get("dtype", "bfloat16"), seed=args.seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Rank:
    """One rank's model, its dispatchers and the timed step functions."""

    def __init__(self, args, rank: int, world: int, device: torch.device) -> None:
        from server.model.loader import load_model
        from server.moe.dispatch import DispatchSettings, build_dispatcher
        from server.moe.routing import build_policy

        self.args, self.rank, self.world, self.device = args, rank, world, device
        names = ["allgather", "alltoall"] + (["local"] if world == 1 else [])
        self.model = load_model(model_config(args), policy=build_policy(args.routing), ep_rank=rank, ep_size=world,
                                device=device, dispatch=DispatchSettings("allgather"))
        slots = self.model.spec.num_experts
        self.dispatchers = {n: build_dispatcher(DispatchSettings(n), rank, world, slots) for n in names}

    def use(self, name: str) -> None:
        """Benchmark-only: swap the dispatcher every MoE layer reads (the model was built with one)."""
        self.model.runtime.dispatcher = self.dispatchers[name]

    def decode_paths(self, batch: int) -> dict:
        """name -> () -> seconds for args.steps decode steps at `batch` rows on this rank."""
        from server.bench.workload import StaticWorkload
        from server.model.gpu.cuda_graphs import DecodeGraphRunner, GraphsUnsupported

        a = self.args
        work = StaticWorkload.build(batch=batch, input_len=a.input_len, output_len=a.steps + 1,
                                    vocab_size=self.model.spec.vocab_size, block_size=16, device=self.device,
                                    seed=a.seed + self.rank, first_seq=self.rank * batch, total_batch=batch * self.world)
        kv = self.model.allocate_kv_cache(work.num_blocks, 16)
        self.use("allgather")
        with torch.inference_mode():
            tok = self.model(work.prefill_batch(), kv).argmax(-1)  # [B]: the KV cache holds the prompts
        decode = work.decode_batches()
        paths = {}
        for name in self.dispatchers:
            self.use(name)
            runner = None
            if name != "alltoall" and self.device.type == "cuda":
                try:
                    runner = DecodeGraphRunner(self.model, kv, max_batch=batch, max_blocks_per_seq=work.block_tables.shape[1])
                except GraphsUnsupported as exc:
                    print(f"rank {self.rank}: {name} stays eager: {exc}", file=sys.stderr)
            paths[name] = self._decode_fn(name, runner, decode, tok, kv, batch)
        return paths

    def _decode_fn(self, name, runner, decode, tok, kv, batch):
        def run() -> float:
            self.use(name)
            sync(self.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(self.args.steps):
                    step = decode.batch(i, tok)
                    step.ep_rows = batch
                    out = runner.run(step, batch) if runner is not None else self.model(step, kv)
                    out[:, 0].cpu()  # a host sync per step, as a server's sampled tokens need
            return time.perf_counter() - t0
        run.graphs = runner is not None
        return run

    def prefill_paths(self) -> dict:
        from server.bench.workload import StaticWorkload

        a = self.args
        seqs = max(1, a.prefill_tokens // a.input_len)
        work = StaticWorkload.build(batch=seqs, input_len=a.input_len, output_len=2, vocab_size=self.model.spec.vocab_size,
                                    block_size=16, device=self.device, seed=a.seed + 100 + self.rank,
                                    first_seq=self.rank * seqs, total_batch=seqs * self.world)
        kv = self.model.allocate_kv_cache(work.num_blocks, 16)

        def make(name):
            def run() -> float:
                self.use(name)
                batch = work.prefill_batch()
                batch.ep_rows = seqs * a.input_len  # the scheduler's common row count: no agreement sync
                sync(self.device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    self.model(batch, kv)[:, 0].cpu()
                return time.perf_counter() - t0
            run.graphs = False
            return run
        return {n: make(n) for n in ("allgather", "alltoall")}


def one_gpu_decode(args, device: torch.device, batch: int):
    """Rank 0 alone: the whole model (every expert), local path, graphs, at the global batch."""
    from server.bench.workload import StaticWorkload
    from server.model.gpu.cuda_graphs import DecodeGraphRunner
    from server.model.loader import load_model
    from server.moe.dispatch import DispatchSettings
    from server.moe.routing import build_policy

    model = load_model(model_config(args), policy=build_policy(args.routing), device=device,
                       dispatch=DispatchSettings("local"))
    work = StaticWorkload.build(batch=batch, input_len=args.input_len, output_len=args.steps + 1,
                                vocab_size=model.spec.vocab_size, block_size=16, device=device, seed=args.seed)
    kv = model.allocate_kv_cache(work.num_blocks, 16)
    with torch.inference_mode():
        tok = model(work.prefill_batch(), kv).argmax(-1)
    runner = None
    if device.type == "cuda":
        runner = DecodeGraphRunner(model, kv, max_batch=batch, max_blocks_per_seq=work.block_tables.shape[1])
    decode = work.decode_batches()

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(args.steps):
                step = decode.batch(i, tok)
                (runner.run(step) if runner is not None else model(step, kv))[:, 0].cpu()
        return time.perf_counter() - t0
    run.graphs = runner is not None
    return run, (model, kv, runner)


def timed(paths: dict, repeats: int, barrier) -> dict:
    """Interleaved repeats: A B C A B C ... -> name -> [seconds per repeat]."""
    for fn in paths.values():
        barrier()
        fn()  # warm-up (compiles, allocator)
    out = {n: [] for n in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            barrier()
            out[name].append(fn())
    return out


def measure(args, rank: int, world: int, device: torch.device, ctrl) -> dict:
    barrier = (lambda: dist.barrier(group=ctrl)) if world > 1 else (lambda: None)
    me = Rank(args, rank, world, device)
    results = {"decode": {}, "prefill": {}}
    for batch in args.batch:
        per_rank = batch // world
        paths = me.decode_paths(per_rank)
        results["decode"][batch] = {"seconds": timed(paths, args.repeats, barrier),
                                    "graphs": {n: f.graphs for n, f in paths.items()}}
    if args.prefill_tokens:
        results["prefill"] = {"seconds": timed(me.prefill_paths(), args.repeats, barrier)}
    del me
    if world > 1 and rank == 0:  # one GPU's rate, in the same run (the other ranks wait)
        for batch in args.batch:
            run, keep = one_gpu_decode(args, device, batch)
            results["decode"][batch]["seconds"]["1gpu"] = timed({"1gpu": run}, args.repeats, lambda: None)["1gpu"]
            results["decode"][batch]["graphs"]["1gpu"] = run.graphs
            del keep
    barrier()
    return results


def report(args, ranks: list[dict], world: int) -> dict:
    med = statistics.median
    doc = {"command": " ".join(sys.argv), "ep": world, "model": args.model, "layers": args.layers,
           "routing": args.routing, "steps": args.steps, "repeats": args.repeats, "device": device_name(args),
           "date": time.strftime("%Y-%m-%d"), "decode": {}, "prefill": None}
    lines = [f"## EP dispatch, ep {world}, {doc['device']}, {args.model} ({args.layers} layers), routing={args.routing}",
             "", "| phase | batch | path | graphs | ms / step | tok/s | vs baseline (median of per-repeat ratios) |",
             "|---|---|---|---|---|---|---|"]
    for batch, entry in ranks[0]["decode"].items():
        names = list(entry["seconds"])
        slowest = {n: [max(r["decode"][batch]["seconds"][n][i] for r in ranks if n in r["decode"][batch]["seconds"])
                       for i in range(args.repeats)] for n in names}
        base = "local" if world == 1 else "1gpu"
        rows = {}
        for n in names:
            step_ms = med(slowest[n]) / args.steps * 1e3
            ratio = med([t / b for t, b in zip(slowest[n], slowest[base])])
            rows[n] = {"step_ms": step_ms, "tok_s": batch / (step_ms / 1e3), "time_vs_" + base: ratio,
                       "graphs": entry["graphs"][n], "repeats_s": slowest[n]}
            lines.append(f"| decode | {batch} | {n} | {rows[n]['graphs']} | {step_ms:.3f} | {rows[n]['tok_s']:.0f} | "
                         f"time x{ratio:.3f} of {base} (tok/s x{1 / ratio:.2f}) |")
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
            lines.append(f"| prefill | {tokens} tok | {n} | False | {med(xs) * 1e3:.3f} | {tokens / med(xs):.0f} | "
                         f"time x{ratio:.3f} of alltoall |")
    print("\n".join(lines))
    return doc


def device_name(args) -> str:
    if args.device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return "cpu"


def rank_main(rank: int, world: int, port: int, args, out: str) -> None:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, default=1, help="EP ranks, one GPU each (1: the forced EP path vs local)")
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
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    for b in args.batch:
        if b % args.ep:
            p.error(f"--batch {b} does not split over --ep {args.ep}")
    if args.device == "cuda" and torch.cuda.device_count() < args.ep:
        p.error(f"--ep {args.ep} needs {args.ep} GPUs; this machine has {torch.cuda.device_count()}")
    os.environ.update(NO_MULTICAST)
    from server.engine.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ranks.pt")
        port = free_port("127.0.0.1")
        if args.ep == 1:
            rank_main(0, 1, port, args, out)
        else:
            import torch.multiprocessing as mp

            mp.spawn(rank_main, args=(args.ep, port, args, out), nprocs=args.ep, join=True)
        ranks = torch.load(out, weights_only=False)
    doc = report(args, ranks, args.ep)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
