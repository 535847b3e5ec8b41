#!/usr/bin/env python
"""MLA decode over the paged latent cache against its roofline, on one GPU: one run, one table.

    python scripts/bench_mla_decode.py --out gpu_out/mla_decode.json   # DeepSeek-V3: 128 heads, 512 + 64
    python scripts/bench_mla_decode.py --heads 64               # Kimi-K2's 64 heads
    python scripts/bench_mla_decode.py --sweep                  # also the swept tiles of both kernels
    python scripts/bench_mla_decode.py --sweep --write-config   # and store the head-block kernel's best

Per case (B sequences of context L, page 16, bf16), three decode paths, each timed as CUDA-graph
replays (triton.testing.do_bench_cudagraph, median) and checked against float32:
  triton_decode  the head-block kernel (server/kernels/mla_decode.py; the serving default) with
                 its stored config for this GPU and shape, else its defaults;
  triton         the varlen MLA kernel run as decode (server/kernels/mla_attention.py);
  dense          the batched matmuls (mla_reference.mla_decode_dense).
The ceilings are measured in the same run: copy bandwidth (1 GiB device copy, read + write
bytes) and the bf16 matmul rate (8192^3). Bytes moved are the ideal ones (every latent row
read once, q read, output written); FLOPs are 2 * B * H * L * (Dk + Dv). With 128 heads a
latent row feeds 128 dot products each way, so the roofline time is max(bytes / copy rate,
FLOPs / matmul rate), and `x roofline` = that time / measured time (1.0 = on the roofline).
Replays are back to back with no cache flush, so a case whose latent fits in L2 (B=128, L=128
reads 19 MB) can read faster than HBM; the long-context cases are the HBM figure.

--sweep times every tile shape of both kernels; for the head-block kernel it then tries split
counts around the heuristic's with the best tiles (reported only: the right count depends on
the context, and a stored config keeps the heuristic's). --write-config stores, per batch size,
the tiles with the least total time over that batch's cases in server/kernels/configs/ (the
file mla_decode_config.py reads). Writes the rows as JSON to --out; `--smoke-cpu` runs tiny
shapes under Triton's interpreter.
"""
from __future__ import annotations

import argparse
import dataclasses
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

from server.bench.decode_roofline import copy_rate_gb_s  # noqa: E402
from server.kernels import mla_decode_config as mdc  # noqa: E402
from server.kernels.mla_attention import mla_decode_triton  # noqa: E402
from server.kernels.mla_decode import launch_plan, mla_decode_headblock_triton  # noqa: E402
from server.kernels.mla_reference import mla_decode_dense  # noqa: E402

CASES = ((128, 128), (8, 128), (128, 1024), (64, 4096), (16, 16384), (1, 32768))  # (B, L): the bench's two, then long
TILES = [(m, n, w, s) for m in (16, 32, 64) for n in (16, 32, 64) for w in (4, 8) for s in (1, 2, 3)]
# (BLOCK_H, BLOCK_N, num_warps, num_stages) of the head-block kernel: at 512 latent dims only 8 warps
# and 2+ stages avoid register spills, and 32-head blocks spill at every setting (compiled for sm_90:
# python -m tests.kernels.support.compile_check --mla-space), so those are left out.
HEADBLOCK_TILES = [(h, n, 8, s) for h in (64, 16) for n in (32, 64, 16) for s in (2, 3, 4)]
SPLIT_FACTORS = (0.25, 0.5, 2, 4)  # split counts tried around the heuristic's, with the best tiles
PATHS = ("triton_decode", "triton", "dense")
DEVICE, DTYPE, PAGE = "cuda", torch.bfloat16, 16
if SMOKE:
    CASES, DEVICE, DTYPE, PAGE = ((3, 40),), "cpu", torch.float32, 8
    TILES, HEADBLOCK_TILES, SPLIT_FACTORS = [(16, 16, 4, 1)], [(16, 16, 4, 1), (16, 32, 4, 1)], (2,)


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
    copy_gb_s = copy_rate_gb_s(torch.device(DEVICE), 1 << 30)
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    mm_us = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median") * 1e3
    return {"copy_GBps": copy_gb_s, "matmul_TFLOPs": 2 * 8192 ** 3 / mm_us / 1e6}


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


def best_of(fn, candidates: list[dict], ref: torch.Tensor, label: str) -> tuple[float, dict, dict] | None:
    """(us, kwargs) of the fastest candidate whose output checks, and every candidate's time."""
    times, best = {}, None
    for kw in candidates:
        try:
            err = rel_err(fn(**kw), ref)
            us = timed(lambda: fn(**kw))  # noqa: B023
        except Exception as exc:  # a shape the compiler rejects (shared memory, registers)
            print(f"  {label} {kw}: skipped ({type(exc).__name__})", file=sys.stderr)
            continue
        times[json.dumps(kw, sort_keys=True, default=dataclasses.asdict)] = us
        if err < 1e-2 and (best is None or us < best[0]):
            best = (us, kw)
    return None if best is None else (best[0], best[1], times)


def sweep(row: dict, paths: dict, ref: torch.Tensor, plan: tuple) -> dict:
    """Both kernels' tile sweeps (row keys <path>_swept_*); returns the head-block kernel's
    {config json: us} for --write-config."""
    old = best_of(paths["triton"], [dict(block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in TILES],
                  ref, "triton tiles")
    if old is not None:
        row["triton_swept_us"], row["triton_swept_tiles"] = old[0], old[1]
    cands = [{"config": mdc.MLADecodeConfig(h, n, w, s)} for h, n, w, s in HEADBLOCK_TILES]
    new = best_of(paths["triton_decode"], cands, ref, "triton_decode tiles")
    if new is None:
        return {}
    row["triton_decode_swept_us"], cfg = new[0], new[1]["config"]
    row["triton_decode_swept_tiles"] = dataclasses.asdict(cfg)
    heuristic = plan[1]
    splits = sorted({max(1, min(mdc.MAX_SPLITS, round(heuristic * f))) for f in SPLIT_FACTORS} - {heuristic})
    by_split = best_of(paths["triton_decode"], [{"config": cfg, "num_splits": n} for n in splits], ref, "splits")
    row["triton_decode_splits"] = {"heuristic": heuristic, "heuristic_us": new[0],
                                   **({} if by_split is None else {"best": by_split[1]["num_splits"],
                                                                   "best_us": by_split[0]})}
    return new[2]


def measure(batch: int, context: int, heads: int, latent: int, rope: int, ceil: dict, args) -> tuple[dict, dict]:
    q, cache, tables, ctx = make_case(batch, context, heads, latent, rope)
    dk, scale = latent + rope, (latent + rope) ** -0.5
    ref = mla_decode_dense(q.float(), cache.float(), tables, ctx, latent, scale)
    out = torch.empty(batch, heads, latent, dtype=DTYPE, device=DEVICE)
    paths = {"triton_decode": lambda **kw: mla_decode_headblock_triton(q, cache, tables, ctx, latent, scale, out=out,
                                                                       **kw),
             "triton": lambda **kw: mla_decode_triton(q, cache, tables, ctx, latent, scale, out=out, **kw),
             "dense": lambda: mla_decode_dense(q, cache, tables, ctx, latent, scale)}
    plan = launch_plan(batch, heads, latent, dk, PAGE, tables.shape[1], DTYPE, q.device)
    row = {"batch": batch, "context": context, "heads": heads, "latent": latent, "rope": rope,
           "triton_decode_config": dataclasses.asdict(plan[0]), "triton_decode_num_splits": plan[1]}
    for name in PATHS:
        row[f"{name}_rel_err"] = rel_err(paths[name](), ref)
        row[f"{name}_us"] = timed(paths[name])
    swept = sweep(row, paths, ref, plan) if args.sweep else {}
    nbytes = batch * context * dk * 2 + batch * heads * (dk + latent) * 2  # latent rows once, q in, out
    flops = 2 * batch * heads * context * (dk + latent)
    floor_us = max(nbytes / (ceil["copy_GBps"] * 1e3), flops / (ceil["matmul_TFLOPs"] * 1e6))
    for name in (*PATHS, "triton_swept", "triton_decode_swept"):
        us = row.get(f"{name}_us")
        if us is None:
            continue
        row[f"{name}_GBps"] = nbytes / us / 1e3
        row[f"{name}_TFLOPs"] = flops / us / 1e6
        row[f"{name}_roofline"] = floor_us / us
    memory_bound = nbytes / (ceil["copy_GBps"] * 1e3) >= flops / (ceil["matmul_TFLOPs"] * 1e6)
    row.update(bytes=nbytes, flops=flops, roofline_us=floor_us, bound="memory" if memory_bound else "compute")
    return row, swept  # the case's tensors are freed here (the path closures hold them until then)


def table(rows: list[dict], ceil: dict) -> str:
    lines = [f"copy {ceil['copy_GBps']:.0f} GB/s, matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s (same run)",
             "| B | L | heads | MB read | bound | roofline us | head-block us | TFLOP/s | x roofline | splits | "
             "varlen us | x roofline | dense us | x roofline | varlen / head-block | swept head-block us (tiles) | "
             "swept varlen us |", "|" + "---|" * 17]
    for r in rows:
        hb = (f"{r['triton_decode_swept_us']:.1f} ({tuple(r['triton_decode_swept_tiles'].values())[:4]})"
              if "triton_decode_swept_us" in r else "-")
        old = f"{r['triton_swept_us']:.1f}" if "triton_swept_us" in r else "-"
        lines.append(f"| {r['batch']} | {r['context']} | {r['heads']} | {r['bytes'] / 1e6:.1f} | {r['bound']} | "
                     f"{r['roofline_us']:.1f} | {r['triton_decode_us']:.1f} | {r['triton_decode_TFLOPs']:.1f} | "
                     f"{r['triton_decode_roofline']:.2f} | {r['triton_decode_num_splits']} | {r['triton_us']:.1f} | "
                     f"{r['triton_roofline']:.2f} | {r['dense_us']:.1f} | {r['dense_roofline']:.2f} | "
                     f"{r['triton_us'] / r['triton_decode_us']:.2f} | {hb} | {old} |")
    return "\n".join(lines)


def write_config(rows: list[dict], swept: list[dict], args, device: str) -> Path:
    """Per batch size, the tiles with the least total time over that batch's cases (num_splits
    left to the heuristic)."""
    table_by_batch = {}
    for batch in sorted({r["batch"] for r in rows}):
        runs = [s for r, s in zip(rows, swept) if r["batch"] == batch and s]
        common = set.intersection(*(set(s) for s in runs)) if runs else set()
        if common:
            best = min(common, key=lambda k: sum(s[k] for s in runs))
            table_by_batch[batch] = mdc.MLADecodeConfig(**json.loads(best)["config"])
    path = mdc.config_path(device.replace(" ", "_").replace("/", "_"), args.heads, args.latent, args.rope, PAGE)
    if args.config_dir:
        path = Path(args.config_dir) / path.name
    meta = {"dtype": str(DTYPE).split(".")[-1], "tool": "scripts/bench_mla_decode.py --sweep --write-config",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "timings_us": {f"B{r['batch']}_L{r['context']}": {"default": r["triton_decode_us"],
                                                              "swept": r.get("triton_decode_swept_us")} for r in rows}}
    mdc.save_table(path, table_by_batch, meta)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=4 if SMOKE else 128)
    ap.add_argument("--latent", type=int, default=32 if SMOKE else 512, help="kv_lora_rank")
    ap.add_argument("--rope", type=int, default=16 if SMOKE else 64, help="qk_rope_head_dim")
    ap.add_argument("--sweep", action="store_true", help="time every tile shape too (minutes)")
    ap.add_argument("--write-config", action="store_true", help="store the head-block kernel's swept tiles")
    ap.add_argument("--config-dir", default="", help="where --write-config writes (default: server/kernels/configs)")
    ap.add_argument("--out", default="gpu_out/mla_decode.json", help="JSON results")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny shapes under Triton's interpreter")
    args = ap.parse_args()
    args.sweep = args.sweep or args.write_config or SMOKE
    ceil = ceilings()
    rows, swept = [], []
    for batch, context in CASES:
        row, times = measure(batch, context, args.heads, args.latent, args.rope, ceil, args)
        rows.append(row)
        swept.append(times)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        print(f"B={batch} L={context}: " + ", ".join(f"{p} {row[f'{p}_us']:.1f} us" for p in PATHS), file=sys.stderr)
    bad = [r for r in rows if max(r[f"{p}_rel_err"] for p in PATHS) > 1e-2]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)"
    out.write_text(json.dumps({"device": device, "dtype": str(DTYPE), "page": PAGE, "ceilings": ceil, "rows": rows},
                              indent=1))
    print(f"{device}, {DTYPE}, page {PAGE}")
    print(table(rows, ceil))
    if args.write_config and not bad:
        print(f"stored the head-block kernel's tiles in {write_config(rows, swept, args, device.split(' (')[0])}")
    faster = sum(r["triton_decode_us"] <= r["triton_us"] for r in rows)
    print(f"head-block kernel faster than the varlen kernel in {faster}/{len(rows)} cases; {len(bad)} failed checks")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
