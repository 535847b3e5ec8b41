"""The EP dispatch paths timed in one process per rank (scripts/bench_ep_dispatch.py drives it).

One model per rank; its dispatcher is swapped between paths (same weights, inputs and KV
cache) and each path's decode graphs are captured with its own dispatcher inside, so the
paths differ only in how tokens reach their experts:
  local      the ep_size 1 path (ep 1 only): fused MoE, no communication
  allgather  the fixed-capacity EP path (graph-safe; at ep 1 over a size-1 group), bf16 rows
  allgather_fp8  the same with FP8 rows on the all-gather (parallel.dispatch_wire=fp8; with
             --fp8-wire): e4m3 codes and group scales, about half the bytes
  alltoall   the variable-split path (a host sync per layer: eager only)
  1gpu       (ep > 1) rank 0 alone, the whole model, local path at the global batch
Repeats are interleaved (A B C A B C ...) so drift hits every path alike; each timed block
syncs the host once per step, as a server needs its sampled tokens.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]


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
        names = ["allgather"] + (["allgather_fp8"] if args.fp8_wire else []) + ["alltoall"] + \
            (["local"] if world == 1 else [])
        self.model = load_model(model_config(args), policy=build_policy(args.routing), ep_rank=rank, ep_size=world,
                                device=device, dispatch=DispatchSettings("allgather"))
        slots = self.model.spec.num_experts
        self.dispatchers = {n: build_dispatcher(path_settings(n), rank, world, slots) for n in names}

    def wire_bytes(self) -> dict[str, int]:
        """Bytes of one token's row on the all-gather, per wire timed (wire.py)."""
        from server.moe.dispatch import wire_row_bytes

        s = self.model.spec
        wires = ["bf16"] + (["fp8"] if self.args.fp8_wire else [])
        return {w: wire_row_bytes(w, s.hidden_size, s.top_k, getattr(torch, s.dtype)) for w in wires}

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
        return {n: make(n) for n in self.dispatchers if n != "local"}


def path_settings(name: str):
    """A timed path's dispatch settings: allgather_fp8 is allgather with FP8 rows on the wire."""
    from server.moe.dispatch import DispatchSettings

    return DispatchSettings("allgather", wire="fp8") if name == "allgather_fp8" else DispatchSettings(name)


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
    results = {"decode": {}, "prefill": {}, "wire_bytes": me.wire_bytes()}
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
