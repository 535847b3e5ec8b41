#!/usr/bin/env python
"""MLA decode over the paged latent cache against its roofline, on one GPU: one run, one table.

    python scripts/bench_mla_decode.py --out gpu_out/mla_decode.json   # DeepSeek-V3: 128 heads, 512 + 64
    python scripts/bench_mla_decode.py --heads 64               # Kimi-K2's 64 heads
    python scripts/bench_mla_decode.py --sweep                  # also every tile shape of the kernel

Per case (B sequences of context L, page 16, bf16): the Triton kernel (server/moe/kernels/
mla_attention.py, default tiles and, with --sweep, the best of the swept ones) and the batched-
matmul alternative (mla_reference.mla_decode_dense, EPSERVE_MLA_DECODE=dense), each timed as
CUDA-graph replays (triton.testing.do_bench_cudagraph, median), each checked against float32.
The ceilings are measured in the same run: copy bandwidth (1 GiB device copy, read + write
bytes) and the bf16 matmul rate (8192^3). Bytes moved are the ideal ones (every latent row
read once, q read, output written); FLOPs are 2 * B * H * L * (Dk + Dv). With 128 heads a
latent row feeds 128 dot products each way, so the roofline time is max(bytes / copy rate,
FLOPs / matmul rate), and `x roofline` = that time / measured time (1.0 = on the roofline).
Replays are back to back with no cache flush, so a case whose latent fits in L2 (B=128, L=128
reads 19 MB) can read faster than HBM; the long-context cases are the HBM figure.
Writes the rows as JSON to --out; `--smoke-cpu` runs tiny shapes under Triton's interpreter.
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
# imported: tests/kernels/test_bench_mla_decode_script.py starts this script that way.
SMOKE = "--smoke-cpu" in sys.argv
if SMOKE and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("--smoke-cpu runs under Triton's interpreter (TRITON_INTERPRET=1, patched as in "
             "tests/kernels/support/interpret.py); run it through tests/kernels/test_bench_mla_decode_script.py")

import torch  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from server.kernels.mla_attention import mla_decode_triton  # noqa: E402
from server.kernels.mla_reference import mla_decode_dense  # noqa: E402

CASES = ((128, 128), (8, 128), (128, 1024), (64, 4096), (16, 16384), (1, 32768))  # (B, L): the bench's two, then long
TILES = [(m, n, w, s) for m in (16, 32, 64) for n in (16, 32, 64) for w in (4, 8) for s in (1, 2, 3)]
DEVICE, DTYPE, PAGE = "cuda", torch.bfloat16, 16
if SMOKE:
    CASES, TILES, DEVICE, DTYPE, PAGE = ((3, 40),), [(16, 16, 4, 1)], "cpu", torch.float32, 8


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf if out has a NaN or inf."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-300)) if torch.isfinite(o).all() else float("inf")


def timed(fn) -> float:
    """Microseconds per call: graph replays on the GPU; one wall-clock call under the interpreter."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def ceilings() -> dict:
    if SMOKE:
        return {"copy_GBps": float("nan"), "matmul_TFLOPs": float("nan")}
    n = 1 << 30
    src = torch.empty(n // 2, device=DEVICE, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    copy_us = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median") * 1e3
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    mm_us = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median") * 1e3
    return {"copy_GBps": 2 * n / copy_us / 1e3, "matmul_TFLOPs": 2 * 8192 ** 3 / mm_us / 1e6}


def make_case(batch: int, context: int, heads: int, latent: int, rope: int, seed: int = 0):
    """q [B, H, Dk], a latent cache whose blocks are shuffled, block tables, context lengths (all L)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    per_seq = -(-context // PAGE)
    blocks = batch * per_seq
    dk = latent + rope
    cache = torch.randn(blocks, PAGE, dk, generator=gen, device=DEVICE, dtype=torch.float32).to(DTYPE)
    q = (torch.randn(batch, heads, dk, generator=gen, device=DEVICE, dtype=torch.float32) * dk ** -0.25).to(DTYPE)
    tables = torch.randperm(blocks, generator=gen, device=DEVICE).to(torch.int32).view(batch, per_seq)
    ctx = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    return q, cache, tables, ctx


def measure(batch: int, context: int, heads: int, latent: int, rope: int, ceil: dict, sweep: bool) -> dict:
    q, cache, tables, ctx = make_case(batch, context, heads, latent, rope)
    dk, scale = latent + rope, (latent + rope) ** -0.5
    ref = mla_decode_dense(q.float(), cache.float(), tables, ctx, latent, scale)
    out = torch.empty(batch, heads, latent, dtype=DTYPE, device=DEVICE)
    paths = {"triton": lambda **kw: mla_decode_triton(q, cache, tables, ctx, latent, scale, out=out, **kw),
             "dense": lambda: mla_decode_dense(q, cache, tables, ctx, latent, scale)}
    row = {"batch": batch, "context": context, "heads": heads, "latent": latent, "rope": rope}
    row["triton_rel_err"] = rel_err(paths["triton"](), ref)
    row["dense_rel_err"] = rel_err(paths["dense"](), ref)
    row["triton_us"] = timed(paths["triton"])
    row["dense_us"] = timed(paths["dense"])
    if sweep:
        best = None
        for m, n, w, s in TILES:
            try:
                fn = lambda: paths["triton"](block_m=m, block_n=n, num_warps=w, num_stages=s)  # noqa: E731
                err = rel_err(fn(), ref)
                us = timed(fn)
            except Exception as exc:  # a tile shape the compiler rejects (shared memory, registers)
                print(f"  tiles {m}x{n} w{w} s{s}: skipped ({type(exc).__name__})", file=sys.stderr)
                continue
            if err < 1e-2 and (best is None or us < best[0]):
                best = (us, {"block_m": m, "block_n": n, "num_warps": w, "num_stages": s})
        if best is not None:
            row["swept_best_us"], row["swept_best_tiles"] = best
    nbytes = batch * context * dk * 2 + batch * heads * (dk + latent) * 2  # latent rows once, q in, out
    flops = 2 * batch * heads * context * (dk + latent)
    floor_us = max(nbytes / (ceil["copy_GBps"] * 1e3), flops / (ceil["matmul_TFLOPs"] * 1e6))
    for name in ("triton", "dense", "swept_best"):
        us = row.get(f"{name}_us")
        if us is None:
            continue
        row[f"{name}_GBps"] = nbytes / us / 1e3
        row[f"{name}_TFLOPs"] = flops / us / 1e6
        row[f"{name}_roofline"] = floor_us / us
    row.update(bytes=nbytes, flops=flops, roofline_us=floor_us,
               bound="memory" if nbytes / (ceil["copy_GBps"] * 1e3) >= flops / (ceil["matmul_TFLOPs"] * 1e6) else "compute")
    del q, cache, tables, ref
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict], ceil: dict) -> str:
    lines = [f"copy {ceil['copy_GBps']:.0f} GB/s, matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s (same run)",
             "| B | L | heads | MB read | bound | roofline us | triton us | GB/s | TFLOP/s | x roofline | dense us | "
             "x roofline | dense us / triton us | best swept (tiles) |", "|" + "---|" * 14]
    for r in rows:
        swept = (f"{r['swept_best_us']:.1f} ({r['swept_best_tiles']})" if "swept_best_us" in r else "-")
        lines.append(f"| {r['batch']} | {r['context']} | {r['heads']} | {r['bytes'] / 1e6:.1f} | {r['bound']} | "
                     f"{r['roofline_us']:.1f} | {r['triton_us']:.1f} | {r['triton_GBps']:.0f} | {r['triton_TFLOPs']:.1f} | "
                     f"{r['triton_roofline']:.2f} | {r['dense_us']:.1f} | {r['dense_roofline']:.2f} | "
                     f"{r['dense_us'] / r['triton_us']:.2f} | {swept} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=4 if SMOKE else 128)
    ap.add_argument("--latent", type=int, default=32 if SMOKE else 512, help="kv_lora_rank")
    ap.add_argument("--rope", type=int, default=16 if SMOKE else 64, help="qk_rope_head_dim")
    ap.add_argument("--sweep", action="store_true", help="time every tile shape too (minutes)")
    ap.add_argument("--out", default="gpu_out/mla_decode.json", help="JSON results")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny shapes under Triton's interpreter")
    args = ap.parse_args()
    ceil = ceilings()
    rows = []
    for batch, context in CASES:
        rows.append(measure(batch, context, args.heads, args.latent, args.rope, ceil, args.sweep or SMOKE))
        print(f"B={batch} L={context}: triton {rows[-1]['triton_us']:.1f} us, dense {rows[-1]['dense_us']:.1f} us",
              file=sys.stderr)
    bad = [r for r in rows if max(r["triton_rel_err"], r["dense_rel_err"]) > 1e-2]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)"
    out.write_text(json.dumps({"device": device, "dtype": str(DTYPE), "page": PAGE,
                                                           "ceilings": ceil, "rows": rows}, indent=1))
    print(f"{device}, {DTYPE}, page {PAGE}")
    print(table(rows, ceil))
    faster = sum(r["triton_us"] <= r["dense_us"] for r in rows)
    print(f"triton faster in {faster}/{len(rows)} cases; {len(bad)} failed checks")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
