#!/usr/bin/env python
"""Tune the fused-MoE block sizes on this GPU and write server/moe/kernels/configs/<device>_E_H_I.json.

    OUT=./gpu_out python scripts/tune_moe.py                       # Qwen3-30B-A3B, ep_size 1
    python scripts/tune_moe.py --experts 32 --tokens 128 8192       # EP4 local experts
    python scripts/tune_moe.py --budget-s 300                       # stop exploring after 300 s

For each token bucket T (random top-k routing), for each BLOCK_M candidate: align once, then
time every gate_up candidate and every down candidate on that alignment (the two GEMMs are
independent given BLOCK_M), and keep the BLOCK_M whose align + best gate_up + best down is
fastest. The chosen config's output is checked against the default config's, and the whole
pipeline is timed with both: a bucket keeps the tuned config only where it measured faster,
else it stores the default config (server/moe/kernels/tuned_table.py; meta.timings_us says
which was kept). Candidates are ordered most-likely-first, so a budget cut keeps
a sensible answer (marked partial in meta). Timings: triton.testing.do_bench median, L2
flushed between runs. The JSON is written to the configs dir (unless --no-write) and to $OUT;
copy the $OUT file into server/moe/kernels/configs/ to keep it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# CPU dry run at tiny shapes under Triton's interpreter, which must be on before triton is
# imported: tests/kernels/test_tune_moe_script.py starts this script that way.
SMOKE = "--smoke-cpu" in sys.argv
if SMOKE and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("--smoke-cpu runs under Triton's interpreter (TRITON_INTERPRET=1, patched as in "
             "tests/kernels/support/interpret.py); run it through tests/kernels/test_tune_moe_script.py")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from server.moe.kernels.fused_moe import fused_moe_triton  # noqa: E402
from server.moe.kernels.moe_align import moe_align_block_size  # noqa: E402
from server.moe.kernels.moe_config import (  # noqa: E402
    GemmConfig, MoEConfig, config_path, default_config, device_key)
from server.moe.kernels.moe_gemm import down_scatter, gate_up_silu  # noqa: E402
from server.moe.kernels.tuned_table import BucketResult, kept_config, tuned_table  # noqa: E402

SMEM_LIMIT = 220 * 1024  # H100: 227 KB per block; keep a margin for Triton's own scratch

# (BLOCK_N, BLOCK_K, num_warps, num_stages), most likely first.
SMALL_M = [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (32, 256, 4, 4), (64, 64, 4, 5), (128, 64, 4, 4),
           (32, 128, 4, 5), (128, 128, 8, 4), (64, 128, 8, 4), (256, 64, 4, 3)]
LARGE_M = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4),
           (64, 128, 4, 3), (256, 32, 8, 4), (128, 32, 4, 5), (256, 64, 8, 4)]


def moe_weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device, seed: int = 0):
    """w13 [E, 2I, H], w2 [E, H, I], scaled so activations stay O(1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device, dtype=dtype) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=device, dtype=dtype) * inter ** -0.5
    return w13, w2


def moe_routing(tokens: int, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype, device, seed: int):
    """x [T, H], ids [T, k] int32 (k distinct random experts per token), weights [T, k] summing to 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    ids = torch.rand(tokens, num_experts, generator=gen).topk(top_k, dim=1).indices.to(torch.int32).to(device)
    w = torch.rand(tokens, top_k, generator=gen).to(device)
    return x, ids, w / w.sum(1, keepdim=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-300)) if torch.isfinite(o).all() else float("inf")


def block_m_candidates(rows_per_expert: float) -> list[int]:
    if rows_per_expert <= 8:
        return [16]
    if rows_per_expert <= 32:
        return [16, 32]
    if rows_per_expert <= 128:
        return [32, 64]
    return [64, 128]


def gemm_candidates(block_m: int, accumulators: int, elem_bytes: int = 2, reg_factor: int = 1) -> list[GemmConfig]:
    """Candidates that fit shared memory and leave registers for operands.

    Accumulator budget per thread: 128 fp32 on the wgmma path (BLOCK_M >= 64, operands from
    shared memory), 64 on the mma.sync path (operands in registers too). Checked without a GPU
    by `python -m tests.kernels.support.compile_check --tune-space` (sm_90: no spills).
    reg_factor 2: each accumulator has a same-sized partner (the FP8 GEMMs scale each dot's
    result before adding it).
    """
    out = []
    acc_budget = 64 if block_m <= 32 else 128
    for bn, bk, warps, stages in (SMALL_M if block_m <= 32 else LARGE_M):
        smem = stages * (block_m * bk + accumulators * bk * bn) * elem_bytes
        regs = reg_factor * accumulators * block_m * bn / (32 * warps)
        if smem <= SMEM_LIMIT and regs <= acc_budget:
            out.append(GemmConfig(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1 if block_m <= 32 else 8, num_warps=warps,
                                  num_stages=stages))
    return out


def with_default(include: bool, default: GemmConfig, candidates: list[GemmConfig]) -> list[GemmConfig]:
    return list(dict.fromkeys([default, *candidates])) if include else candidates


def bench(fn, rep_ms: int) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return do_bench(fn, warmup=5, rep=rep_ms, return_mode="median") * 1e3  # us


def best_of(name: str, candidates: list[GemmConfig], run, rep_ms: int, deadline: float) -> tuple[GemmConfig, float, int]:
    best, best_us, tried = None, float("inf"), 0
    for cfg in candidates:
        if tried and time.time() > deadline:
            break
        try:
            us = bench(lambda: run(cfg), rep_ms)
        except Exception as exc:  # out of resources / compile failure: skip this candidate
            print(f"  skip {name} {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
            continue
        tried += 1
        if us < best_us:
            best, best_us = cfg, us
    if best is None:
        raise RuntimeError(f"no {name} candidate ran")
    return best, best_us, tried


def tune_bucket(tokens, args, w13, w2, deadline) -> BucketResult:
    dtype = w13.dtype
    x, ids, w = moe_routing(tokens, args.hidden, args.experts, args.top_k, dtype, args.device, seed=tokens)
    wf = w.reshape(-1).float().contiguous()
    slots = torch.empty(tokens * args.top_k, args.hidden, dtype=dtype, device=args.device)
    per_expert = tokens * args.top_k / args.experts
    default = default_config(tokens * args.top_k, args.experts, dtype)
    results = []
    for bm in dict.fromkeys([*block_m_candidates(per_expert), default.BLOCK_M]):  # the default is always a candidate
        al = moe_align_block_size(ids, args.experts, bm)
        align_us = bench(lambda: moe_align_block_size(ids, args.experts, bm), args.rep_ms)
        act = gate_up_silu(x, w13, al, default_config(tokens * args.top_k, args.experts, dtype).gate_up,
                           row_div=args.top_k)
        first = bm == default.BLOCK_M
        gu, gu_us, n_gu = best_of("gate_up", with_default(first, default.gate_up, gemm_candidates(bm, 2)),
                                  lambda c: gate_up_silu(x, w13, al, c, row_div=args.top_k, act=act), args.rep_ms,
                                  deadline)
        dn, dn_us, n_dn = best_of("down", with_default(first, default.down, gemm_candidates(bm, 1)), lambda c: down_scatter(act, w2, al, c, slots, wf),
                                  args.rep_ms, deadline)
        results.append((align_us + gu_us + dn_us, MoEConfig(bm, gu, dn), {"align_us": align_us, "gate_up_us": gu_us,
                        "down_us": dn_us, "tried": n_gu + n_dn}))
        print(f"  T={tokens} BLOCK_M={bm}: align {align_us:.1f} + gate_up {gu_us:.1f} + down {dn_us:.1f} us "
              f"({n_gu}+{n_dn} candidates)", flush=True)
    total, cfg, parts = min(results, key=lambda r: r[0])
    out_tuned = fused_moe_triton(x, w13, w2, ids, w, config=cfg)
    out_default = fused_moe_triton(x, w13, w2, ids, w, config=default)
    agreement = rel_err(out_tuned, out_default.float())
    if agreement > 1e-2:
        raise RuntimeError(f"T={tokens}: tuned config {cfg} disagrees with the default config (rel err {agreement:.2e})")
    tuned_us = bench(lambda: fused_moe_triton(x, w13, w2, ids, w, config=cfg), args.rep_ms * 2)
    default_us = bench(lambda: fused_moe_triton(x, w13, w2, ids, w, config=default), args.rep_ms * 2)
    return BucketResult(tuned=cfg, default=default, tuned_us=tuned_us, default_us=default_us,
                        parts=parts)


def make_parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128, help="local experts on one EP rank")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768, help="moe_intermediate_size")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 128, 512, 2048, 8192])
    ap.add_argument("--rep-ms", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=360.0, help="stop trying new candidates after this long")
    ap.add_argument("--no-write", action="store_true", help="write only to $OUT, not the configs dir")
    ap.add_argument("--smoke-cpu", action="store_true", help="CPU interpreter dry run at tiny shapes")
    return ap


def setup(args) -> str:
    """Device and smoke-mode shapes into args; the device name the config file is keyed by."""
    args.device = "cpu" if SMOKE else "cuda"
    if SMOKE:
        global SMALL_M, LARGE_M
        args.experts, args.hidden, args.inter, args.top_k, args.tokens = 4, 64, 32, 2, [3, 40]
        SMALL_M, LARGE_M = [(32, 32, 4, 2), (16, 64, 4, 2)], [(32, 32, 4, 2)]
        args.no_write = True
    return device_key() if not SMOKE else "cpu_smoke"


def write_results(results: dict, args, name: str, dtype: str, path: Path, start: float, deadline: float) -> None:
    """The table (meta + buckets) to $OUT and, unless --no-write, to `path`; a summary on stdout."""
    table, timings = tuned_table(results)
    meta = {"top_k": args.top_k, "dtype": dtype, "device": name, "torch": torch.__version__,
            "triton": triton.__version__, "tool": f"scripts/{Path(sys.argv[0]).name}",
            "seconds": round(time.time() - start, 1), "partial": time.time() > deadline,
            "date": time.strftime("%Y-%m-%d"), "timings_us": timings}
    data = {"meta": meta, **table}
    out_dir = Path(os.environ.get("OUT", "./gpu_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / path.name).write_text(json.dumps(data, indent=1))
    if not args.no_write:
        path.write_text(json.dumps(data, indent=1))
    print(f"\n{'T':>6} {'kept':>7} {'BM':>4} {'gate_up (N,K,w,s)':>18} {'down (N,K,w,s)':>16} {'tuned_us':>9} "
          f"{'default_us':>10} {'speedup':>7}")
    for t, r in results.items():
        c, kept = kept_config(r)
        g = f"{c.gate_up.BLOCK_N},{c.gate_up.BLOCK_K},{c.gate_up.num_warps},{c.gate_up.num_stages}"
        d = f"{c.down.BLOCK_N},{c.down.BLOCK_K},{c.down.num_warps},{c.down.num_stages}"
        print(f"{t:>6} {kept:>7} {c.BLOCK_M:>4} {g:>18} {d:>16} {r.tuned_us:>9.1f} {r.default_us:>10.1f} "
              f"{r.default_us / r.tuned_us:>7.2f}")
    print(f"# wrote {out_dir / path.name}{'' if args.no_write else ' and ' + str(path)}"
          f"; {time.time() - start:.0f}s{' (budget hit: partial)' if meta['partial'] else ''}")


def main() -> int:
    args = make_parser(__doc__).parse_args()
    name = setup(args)
    start = time.time()
    deadline = start + args.budget_s
    print(f"# tuning E={args.experts} H={args.hidden} I={args.inter} top_k={args.top_k} on {name}", flush=True)
    w13, w2 = moe_weights(args.experts, args.hidden, args.inter, torch.bfloat16, args.device)
    results = {t: tune_bucket(t, args, w13, w2, deadline) for t in args.tokens}
    write_results(results, args, name, "bfloat16", config_path(name, args.experts, args.hidden, args.inter), start,
                  deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
