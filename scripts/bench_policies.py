#!/usr/bin/env python3
"""Cost per call of each routing policy, against LightLLM's fake-balance generator.

    python scripts/bench_policies.py --device cpu
    python scripts/bench_policies.py --device cuda --out policies.json

Times one policy call on router outputs of N tokens (E experts, top-k; every E of --experts):
eager (a loop of calls between two device syncs, so launch overhead and the host's Python
count) and, on CUDA, the replay of a CUDA graph holding one call, and per call in a graph of
LAYER_CALLS calls (what a policy costs each MoE layer of a captured forward, where the graph
launch is paid once per step). LightLLM's generator (server/moe/routing/lightllm_rule.py) is
timed once per N as the baseline of the speed-up column. On CUDA the greedy kernels and the
torch paths are timed beside the policies, and so is the MoE block a policy precedes (the
fused Triton MoE on random bf16 weights, then the block-FP8 one on the same weights in e4m3,
each labelled with its roofline: Qwen3-30B-A3B's experts at E=128, DeepSeek-V3's at E=256), so
the last column reads as "policy cost / bf16 MoE block cost" in a graph. The routing
context has --ep-size ranks (rank_balanced balances them). Prints a markdown table; --out
writes JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.moe.routing import RoutingContext, build_policy  # noqa: E402
from server.moe.routing.lightllm_rule import lightllm_generator_torch  # noqa: E402

POLICIES = ["natural", "round_robin_balanced", "greedy_balanced", "uniform_random", "skewed", "optimal_balanced",
            "optimal_balanced:price_steps=12,repair_rounds=8", "rank_balanced", "rank_balanced:tolerance=0.1"]
LAYER_CALLS = 48  # MoE layers of a Qwen3-30B-A3B-sized model: calls per captured forward
#: experts -> (hidden, expert intermediate) of the MoE block timed beside the policies
MOE_BLOCKS = {128: (2048, 768), 256: (7168, 2048)}
BATCH_SECONDS = 0.1  # each timed batch of eager calls lasts about this long (slow policies get fewer calls)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(spec: str):
    """'rank_balanced:tolerance=0.1' -> that policy (the eval's name:key=value form)."""
    from server.eval.cli import parse_policy

    name, params = parse_policy(spec)
    return build_policy(name, **params)


def calls_per_batch(fn, device: str, iters: int) -> int:
    """At most `iters`, fewer for a slow call, so a batch lasts about BATCH_SECONDS."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return max(3, min(iters, int(BATCH_SECONDS / max(time.perf_counter() - t0, 1e-9))))


def time_eager(fn, device: str, iters: int) -> float:
    """Median over 5 batches of the mean seconds per call (launch overhead included)."""
    iters = calls_per_batch(fn, device, iters)
    samples = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def time_graph(fn, iters: int, calls: int = 1) -> float:
    """Seconds per call, replaying a CUDA graph that holds `calls` calls (median of 5 batches)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():  # natural launches nothing: its empty graph is the replay floor
        warnings.filterwarnings("ignore", message="The CUDA Graph is empty")
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters / calls)
    return statistics.median(samples)


def comparison_row(label: str, n: int, fn, device: str, iters: int) -> dict:
    """A row for a kernel or path timed beside the policies (eager and one-call graph, no speed-up)."""
    iters = calls_per_batch(fn, device, iters)
    return {"policy": label, "n": n, "eager_us": time_eager(fn, device, iters) * 1e6,
            "graph_us": time_graph(fn, iters) * 1e6, "speedup_vs_lightllm": None}


#: the ceilings a MoE block's floor divides by; on CUDA, measure_ceilings() replaces them with
#: this GPU's own rates, measured in the same run (these are an H100's, for CPU runs' labels)
CEILINGS = {"copy_bytes_per_s": 3.0e12, "bf16_flop_per_s": 730e12, "fp8_flop_per_s": 1460e12}


def measure_ceilings() -> dict:
    """This GPU's copy bandwidth (1 GiB device copy, read + write bytes), bf16 matmul rate
    (8192^3) and e4m3 matmul rate (8192^3 through torch._scaled_mm, unit scales; the bf16 rate
    x 2 where that op is missing), each a do_bench median."""
    from triton.testing import do_bench

    from server.bench.decode_roofline import copy_rate_gb_s

    copy_bytes_per_s = copy_rate_gb_s(torch.device("cuda"), 1 << 30) * 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192 ** 3
    bf16 = flops / (do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median") / 1e3)
    fp8 = 2 * bf16
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # [M, K] row-major, [K, N] column-major
        one = torch.ones((), device="cuda")
        fp8 = flops / (do_bench(lambda: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16), warmup=25,
                                rep=100, return_mode="median") / 1e3)
    except (RuntimeError, AttributeError) as e:  # no FP8 tensor cores (cc < 8.9) or no _scaled_mm
        print(f"e4m3 matmul not timed ({e}); its rate is taken as twice bf16's", flush=True)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": copy_bytes_per_s, "bf16_flop_per_s": bf16, "fp8_flop_per_s": fp8}


def moe_floor_us(n: int, num_experts: int, top_k: int, hidden: int, inter: int, weight_bytes: float,
                 flop_per_s: float, copy_bytes_per_s: float) -> float:
    """Roofline of one MoE block call: the larger of the expected active experts' weight bytes
    over copy bandwidth and the routed rows' FLOPs over the tensor-core rate (activations ignored)."""
    active = num_experts * (1 - (1 - top_k / num_experts) ** n)
    memory = active * 3 * hidden * inter * weight_bytes / copy_bytes_per_s
    compute = n * top_k * 2 * 3 * hidden * inter / flop_per_s
    return max(memory, compute) * 1e6


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> e4m3 codes and 128x128 block scales, one expert at a time (the fp32 copy of
    all of DeepSeek-V3's experts at once would not fit)."""
    from server.moe.kernels.moe_reference_fp8 import quantize_weight_blocks

    parts = [quantize_weight_blocks(w[e]) for e in range(w.shape[0])]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


def floor_row(row: dict, floor_us: float) -> dict:
    """A MoE block row with its roofline and the share of it reached in a graph (1.0 = on it)."""
    return {**row, "floor_us": floor_us, "of_floor": floor_us / row["graph_us"]}


def moe_block_rows(n: int, num_experts: int, top_k: int, ids: torch.Tensor, weights: torch.Tensor,
                   iters: int) -> list[dict]:
    """The MoE block a policy precedes, on the router's own ids, with random weights: the fused
    Triton MoE in bf16, then the block-FP8 (W8A8) one on the same weights quantised to e4m3 with
    128x128 block scales, each with its roofline (floor_us). The bf16 row comes first."""
    from server.moe.kernels.fused_moe import fused_moe_triton
    from server.moe.kernels.fused_moe_fp8 import fused_moe_fp8_triton

    hidden, inter = MOE_BLOCKS[num_experts]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, hidden, device="cuda", generator=g, dtype=torch.bfloat16)  # [N, H]
    w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02  # [E, 2I, H]
    w2 = torch.randn(num_experts, hidden, inter, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02  # [E, H, I]
    gates = weights.to(torch.bfloat16)
    floor = moe_floor_us(n, num_experts, top_k, hidden, inter, 2, CEILINGS["bf16_flop_per_s"], CEILINGS["copy_bytes_per_s"])
    fn = functools.partial(fused_moe_triton, x, w13, w2, ids, gates)
    rows = [floor_row(comparison_row(f"MoE block (fused MoE, H={hidden}, I={inter}, bf16; floor {floor:,.0f} µs)", n, fn,
                                     "cuda", iters), floor)]
    q13, q2 = quantize_experts(w13), quantize_experts(w2)  # e4m3 [E, N, K] + fp32 [E, N/128, K/128]
    fn = functools.partial(fused_moe_fp8_triton, x, *q13, *q2, ids, gates)
    del w13, w2, q13, q2  # the bf16 weights go; fn holds the FP8 ones
    torch.cuda.empty_cache()
    floor = moe_floor_us(n, num_experts, top_k, hidden, inter, 1 + 4 / 128 ** 2, CEILINGS["fp8_flop_per_s"],
                         CEILINGS["copy_bytes_per_s"])
    rows.append(floor_row(comparison_row(f"MoE block (fused MoE, H={hidden}, I={inter}, FP8 W8A8; floor {floor:,.0f} µs)",
                                         n, fn, "cuda", iters), floor))
    del fn
    torch.cuda.empty_cache()
    return rows


def bench(device: str, ns: list[int], experts: list[int], top_k: int, lightllm_max_n: int, iters: int,
          dtype: torch.dtype, ep_size: int, policies: list[str] = POLICIES, torch_paths: bool = True) -> list[dict]:
    rows = []
    for num_experts in experts:
        for row in bench_experts(device, ns, num_experts, top_k, lightllm_max_n, iters, dtype, ep_size, policies,
                                 torch_paths):
            rows.append({"experts": num_experts, **row})
    return rows


def emit(rows: list[dict], row: dict) -> None:
    """Keep `row` and print it at once: a run stopped part-way still shows what it measured."""
    rows.append(row)
    us = lambda key: "-" if row.get(key) is None else f"{row[key]:,.1f}"  # noqa: E731
    print(f"  {row['policy']} N={row['n']}: eager {us('eager_us')} µs, graph {us('graph_us')} µs, "
          f"{LAYER_CALLS} per graph {us('graph_layers_us')} µs", flush=True)


def bench_experts(device: str, ns: list[int], num_experts: int, top_k: int, lightllm_max_n: int, iters: int,
                  dtype: torch.dtype, ep_size: int, policies: list[str] = POLICIES, torch_paths: bool = True) -> list[dict]:
    rows = []
    for n in ns:
        logits = torch.randn(n, num_experts, device=device).to(dtype)  # [N, E] router logits
        weights, ids = logits.softmax(-1).topk(top_k)  # [N, k]
        ids = ids.to(torch.int32)
        ctx = RoutingContext(layer=0, num_experts=num_experts, top_k=top_k, ep_size=ep_size)
        moe = None
        if device.startswith("cuda") and num_experts in MOE_BLOCKS:
            moe_rows = moe_block_rows(n, num_experts, top_k, ids, weights, iters)
            for row in moe_rows:
                emit(rows, row)
            moe = moe_rows[0]  # the bf16 block: what "graph vs MoE block" divides by
        lightllm_s = None
        if n <= lightllm_max_n:
            sync(device)
            t0 = time.perf_counter()
            lightllm_generator_torch(n, num_experts, top_k, device=device)
            sync(device)
            lightllm_s = time.perf_counter() - t0
            emit(rows, {"policy": "LightLLM generator", "n": n, "eager_us": lightllm_s * 1e6, "graph_us": None, "speedup_vs_lightllm": 1.0})
        for spec in policies:
            policy = build(spec)
            fn = lambda: policy(ids, weights, logits, ctx)  # noqa: E731
            calls = calls_per_batch(fn, device, iters)
            eager = time_eager(fn, device, calls)
            graph = time_graph(fn, calls) if device.startswith("cuda") else None
            layers = time_graph(fn, max(calls // 8, 3), LAYER_CALLS) if device.startswith("cuda") else None
            emit(rows, {
                "policy": spec, "n": n, "eager_us": eager * 1e6, "graph_us": None if graph is None else graph * 1e6,
                "graph_layers_us": None if layers is None else layers * 1e6,
                "speedup_vs_lightllm": None if lightllm_s is None else lightllm_s / min(x for x in (eager, graph) if x is not None),
                "vs_moe_block": None if moe is None or graph is None else graph * 1e6 / moe["graph_us"],
            })
        if device.startswith("cuda") and torch_paths:  # the capacity solvers' torch path, where their kernels take the call
            from server.moe.routing.capacity_solver import capacitated_topk

            for spec in (s for s in policies if s.split(":")[0] in ("optimal_balanced", "rank_balanced")):
                policy = build(spec)
                if policy.fused_batch(n, ctx) is None:
                    continue
                caps = policy.capacities(n, ctx)
                f = lambda: capacitated_topk(logits.float(), top_k, caps, price_steps=policy.price_steps,  # noqa: E731
                                             repair_rounds=policy.repair_rounds)
                emit(rows, comparison_row(f"{spec} (torch path)", n, f, device, iters))
        if device.startswith("cuda") and torch_paths:  # greedy's torch path on the GPU, for comparison with the kernel
            from server.moe.routing.greedy import greedy_balanced_torch
            eager = time_eager(lambda: greedy_balanced_torch(logits, top_k), device, max(iters // 10, 5))
            emit(rows, {"policy": "greedy_balanced (torch path)", "n": n, "eager_us": eager * 1e6, "graph_us": None, "speedup_vs_lightllm": None})
            from server.moe.routing.uniform_random import uniform_random_torch  # the pre-kernel path, same ids
            f = lambda: uniform_random_torch(n, num_experts, top_k, 12345, 0, logits.device)  # noqa: E731
            emit(rows, comparison_row("uniform_random (torch path)", n, f, device, iters))
            from server.moe.kernels.greedy_route import greedy_balanced_triton
            from server.moe.kernels.greedy_route_cuda import greedy_balanced_cuda
            for score_dtype in (torch.float32, torch.bfloat16):
                scores = logits.to(score_dtype)
                f = lambda: greedy_balanced_triton(scores, top_k)  # noqa: E731
                emit(rows, comparison_row(f"greedy Triton kernel {str(score_dtype)[6:]}", n, f, device, iters))
            # The CUDA kernel's ranked lists cover less of the round when scores spread wider than
            # 255 bf16 codes or share a per-expert bias; its exact fallback then costs more.
            variants = {"randn": logits, "randn x100": logits.float() * 100, "randn + expert bias": logits.float() + torch.linspace(-3, 3, num_experts, device=device)}
            for label, variant in variants.items():
                scores = variant.to(torch.bfloat16)
                if greedy_balanced_cuda(scores, top_k) is None:
                    continue
                f = lambda: greedy_balanced_cuda(scores, top_k)  # noqa: E731
                emit(rows, comparison_row(f"greedy CUDA kernel bfloat16, {label} logits", n, f, device, iters))
    return rows


def table(rows: list[dict]) -> str:
    def fmt(x):
        return "-" if x is None else (f"{x:,.1f}" if x < 1e5 else f"{x:,.0f}")
    lines = [f"| policy | E | N | eager µs/call | graph replay µs/call | µs/call, {LAYER_CALLS} calls per graph | "
             "vs LightLLM generator | graph vs MoE block |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = "-" if r["speedup_vs_lightllm"] is None else f"{r['speedup_vs_lightllm']:,.0f}x"
        share = "-" if r.get("vs_moe_block") is None else f"{r['vs_moe_block']:.1%}"
        if r.get("of_floor") is not None:
            share = f"{r['of_floor']:.0%} of floor"
        lines.append(f"| {r['policy']} | {r['experts']} | {r['n']} | {fmt(r['eager_us'])} | {fmt(r['graph_us'])} | "
                     f"{fmt(r.get('graph_layers_us'))} | {sp} | {share} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, nargs="+", default=[128, 8192])
    ap.add_argument("--experts", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--ep-size", type=int, default=8, help="EP ranks in the routing context (rank_balanced balances them)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--lightllm-max-n", type=int, default=8192, help="time LightLLM's generator only up to this N")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="router logits dtype")
    ap.add_argument("--policies", nargs="+", default=POLICIES, help="policy specs (name or name:key=value,...)")
    ap.add_argument("--no-torch-paths", dest="torch_paths", action="store_false",
                    help="on CUDA, time only the policies and the MoE block, not the kernels' torch paths and variants")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        CEILINGS.update(measure_ceilings())
        print("ceilings (same run): " + ", ".join(f"{k} {v:.3g}" for k, v in CEILINGS.items()), flush=True)
    rows = bench(args.device, args.n, args.experts, args.top_k, args.lightllm_max_n, args.iters, getattr(torch, args.dtype),
                 args.ep_size, args.policies, args.torch_paths)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    header = (f"device: {name}; torch {torch.__version__}; E={args.experts}, k={args.top_k}, ep_size {args.ep_size}; "
              f"router logits {args.dtype}")
    print(header)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": name, "ceilings": CEILINGS, "torch": torch.__version__, "experts": args.experts, "top_k": args.top_k, "ep_size": args.ep_size, "logits_dtype": args.dtype, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
