#!/usr/bin/env python
"""MLA prefill, absorbed vs expanded, against the bf16 matmul peak, on one GPU: one run, one table.

    python scripts/bench_mla_prefill.py --out gpu_out/mla_prefill.json   # DeepSeek-V3: 128 heads
    python scripts/bench_mla_prefill.py --sweep                  # also the expanded kernel's tiles
    python scripts/bench_mla_prefill.py --sweep --write-config   # and store the best for this GPU

Per case (B whole prompts of L tokens, page 16, bf16; kv_lora_rank 512 + rope 64, nope 128,
v 128), the two forms of server/model/mla_attention.py, each timed (triton.testing.do_bench,
median) as the model runs it and as its attention kernel alone, and checked against float32 on
the first 16 heads:
  absorbed  q_nope through W_UK, the varlen latent-cache kernel (server/kernels/mla_attention.py),
            the output through W_UV;
  expanded  the prompt's latent rows through kv_b_proj into K/V (the decompression matmul), the
            flash-attention kernel (server/kernels/mla_prefill_expanded.py).
Useful causal FLOPs per form: attention 2 * H * (Dqk + Dv) * L (L + 1) / 2 per prompt, with
(Dqk, Dv) = (576, 512) absorbed and (192, 128) expanded, plus absorbed 2 * 2 * T * H * 128 * 512
for its projections and expanded 2 * L * 512 * H * 256 for the decompression. Each path's
TFLOP/s is its own FLOPs over its time, `of peak` that over the bf16 matmul rate measured in
the same run (8192^3). The target is the expanded kernel at >= 50% of peak at L = 4096.

`crossover_len` is where the whole expanded path starts to beat the absorbed one at B = 1
(interpolated in log L between the measured lengths): for a whole prompt it equals the step's
queries per key, so it is the value server/kernels/mla_prefill_config.py's
EXPANDED_MIN_QUERIES_PER_KEY should hold. --sweep times the expanded kernel's tile shapes at
every case; --write-config stores the tiles with the least total time in server/kernels/configs/.
Writes the rows as JSON to --out; `--smoke-cpu` runs tiny shapes under Triton's interpreter.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# CPU dry run at tiny shapes under Triton's interpreter, which must be on before triton is
# imported: tests/kernels/test_bench_mla_prefill_script.py starts this script that way.
SMOKE = "--smoke-cpu" in sys.argv
if SMOKE and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("--smoke-cpu runs under Triton's interpreter (TRITON_INTERPRET=1, patched as in "
             "tests/kernels/support/interpret.py); run it through tests/kernels/test_bench_mla_prefill_script.py")

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from server.kernels import mla_prefill_config as mpc  # noqa: E402
from server.kernels.mla_attention import mla_prefill_triton  # noqa: E402
from server.kernels.mla_prefill_expanded import mla_prefill_expanded_triton  # noqa: E402
from server.kernels.mla_reference import mla_prefill_expanded_reference  # noqa: E402

LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192)  # B = 1; the short ones place the crossover
CASES = tuple((1, n) for n in LENGTHS) + ((4, 1024), (4, 4096), (2, 8192))
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the expanded kernel: those that compile for sm_90 at
# these widths without register spills and within shared memory (4 warps with 128 rows, or
# 64 x 128 tiles with 4 warps, spill; 128 x 128 with 3 stages needs 288 KB): test_kernels_compile_sm90.py
TILES = [(128, 64, 8, s) for s in (2, 3, 4)] + [(64, 64, 4, s) for s in (2, 3, 4)] + [
    (128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 3)]
CHECK_HEADS = 16
DEVICE, DTYPE, PAGE = "cuda", torch.bfloat16, 16
if SMOKE:
    CASES, DEVICE, DTYPE, PAGE, CHECK_HEADS = ((1, 24), (1, 40), (2, 33)), "cpu", torch.float32, 8, 2
    TILES = [(16, 16, 4, 1), (16, 32, 4, 1)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-300)) if torch.isfinite(o).all() else float("inf")


def timed(fn) -> float:
    """Microseconds per call (median); one wall-clock call under the interpreter."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e3


def matmul_peak() -> float:
    """bf16 TFLOP/s of one 8192^3 matmul (nan under the interpreter)."""
    if SMOKE:
        return float("nan")
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    return 2 * 8192 ** 3 / (do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median") * 1e3) / 1e6


@dataclasses.dataclass
class Case:
    """B whole prompts of L tokens: projections' outputs, the latent rows and their paged copy."""
    q_nope: torch.Tensor  # [T, H, nope]
    q_rope: torch.Tensor  # [T, H, r]
    latent: torch.Tensor  # [T, R + r] (this step's rows; the whole context of each prompt)
    cache: torch.Tensor  # [NB, PAGE, R + r], shuffled blocks
    tables: torch.Tensor  # [B, L / PAGE] int32
    cu: torch.Tensor  # [B+1] int32
    ctx: torch.Tensor  # [B] int32
    w_kv: torch.Tensor  # kv_b_proj.weight [H * (nope + v), R]


def make_case(batch: int, length: int, heads: int, a) -> Case:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=DEVICE, dtype=torch.float32)  # noqa: E731
    t, dk = batch * length, a.latent + a.rope
    latent = rnd(t, dk).to(DTYPE)
    per_seq = -(-length // PAGE)
    tables = torch.randperm(batch * per_seq, generator=gen, device=DEVICE).to(torch.int32).view(batch, per_seq)
    pos = torch.arange(length, device=DEVICE)
    slots = (tables.long()[:, pos // PAGE] * PAGE + pos % PAGE).reshape(-1)  # [T]
    cache = torch.zeros(batch * per_seq * PAGE, dk, device=DEVICE, dtype=DTYPE)
    cache[slots] = latent
    scale_q = (a.nope + a.rope) ** -0.25
    return Case(q_nope=(rnd(t, heads, a.nope) * scale_q).to(DTYPE), q_rope=(rnd(t, heads, a.rope) * scale_q).to(DTYPE),
                latent=latent, cache=cache.view(-1, PAGE, dk), tables=tables,
                cu=torch.arange(0, t + 1, length, device=DEVICE, dtype=torch.int32),
                ctx=torch.full((batch,), length, device=DEVICE, dtype=torch.int32),
                w_kv=(rnd(heads * (a.nope + a.v), a.latent) * a.latent ** -0.5).to(DTYPE))


def paths(c: Case, heads: int, length: int, a) -> dict:
    """name -> zero-argument callable returning [T, H, v] ("absorbed_kernel": [T, H, R]); the
    kernel-only ones reuse inputs made here once."""
    scale = (a.nope + a.rope) ** -0.5
    w = c.w_kv.view(heads, a.nope + a.v, a.latent)
    w_uk, w_uv = w[:, :a.nope], w[:, a.nope:]  # [H, nope, R], [H, v, R]

    def absorbed_q():
        q_lat = torch.bmm(c.q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, R]
        return torch.cat((q_lat, c.q_rope), dim=-1)  # [T, H, R + r]

    def absorbed_kernel(q, **kw):
        return mla_prefill_triton(q, c.cache, c.tables, c.cu, c.ctx, a.latent, scale, max_query_len=length, **kw)

    def absorbed():
        o = absorbed_kernel(absorbed_q())  # [T, H, R]
        return torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, v]

    def decompress():
        kv = torch.nn.functional.linear(c.latent[:, :a.latent], c.w_kv).view(-1, heads, a.nope + a.v)
        return kv[..., :a.nope], c.latent[:, None, a.latent:], kv[..., a.nope:]  # k_nope, k_rope, v

    def expanded_kernel(k, config=None):
        return mla_prefill_expanded_triton(c.q_nope, c.q_rope, *k, c.cu, c.cu, scale, max_query_len=length,
                                           config=config)

    q_abs, k_exp = absorbed_q(), decompress()
    return {"absorbed": absorbed, "absorbed_kernel": lambda: absorbed_kernel(q_abs),
            "expanded": lambda: expanded_kernel(decompress()), "expanded_kernel": lambda: expanded_kernel(k_exp),
            "_expanded_tiles": lambda cfg: expanded_kernel(k_exp, cfg), "_k": k_exp}


def flops(batch: int, length: int, heads: int, a) -> dict:
    pairs = batch * length * (length + 1) // 2  # causal (query, key) pairs
    t = batch * length
    attn_abs = 2 * heads * (2 * a.latent + a.rope) * pairs
    attn_exp = 2 * heads * (a.nope + a.rope + a.v) * pairs
    proj_abs = 2 * 2 * t * heads * a.nope * a.latent
    decomp = 2 * t * a.latent * heads * (a.nope + a.v)
    return {"absorbed": attn_abs + proj_abs, "absorbed_kernel": attn_abs, "expanded": attn_exp + decomp,
            "expanded_kernel": attn_exp}


def measure(batch: int, length: int, heads: int, peak: float, a) -> tuple[dict, dict]:
    c = make_case(batch, length, heads, a)
    fns = paths(c, heads, length, a)
    h = min(CHECK_HEADS, heads)
    k_n, k_r, v = fns["_k"]
    ref = mla_prefill_expanded_reference(c.q_nope[:, :h].float(), c.q_rope[:, :h].float(), k_n[:, :h].float(),
                                         k_r.float(), v[:, :h].float(), c.cu, c.cu, (a.nope + a.rope) ** -0.5)
    row = {"batch": batch, "length": length, "heads": heads,
           "expanded_config": dataclasses.asdict(mpc.get_mla_prefill_config(heads, a.nope + a.rope, a.v, DTYPE,
                                                                           torch.device(DEVICE)))}
    work = flops(batch, length, heads, a)
    for name in ("absorbed", "absorbed_kernel", "expanded", "expanded_kernel"):
        if name != "absorbed_kernel":  # its output is the latent [T, H, R] (checked as part of "absorbed")
            row[f"{name}_rel_err"] = rel_err(fns[name]()[:, :h], ref)
        us = timed(fns[name])
        row.update({f"{name}_us": us, f"{name}_TFLOPs": work[name] / us / 1e6,
                    f"{name}_of_peak": work[name] / us / 1e6 / peak, f"{name}_flops": work[name]})
    swept = {}
    if a.sweep:
        for m, n, wp, s in TILES:
            cfg = mpc.MLAPrefillConfig(m, n, wp, s)
            try:
                err = rel_err(fns["_expanded_tiles"](cfg)[:, :h], ref)
                us = timed(lambda: fns["_expanded_tiles"](cfg))  # noqa: B023
            except Exception as exc:  # a shape the compiler rejects (shared memory, registers)
                print(f"  tiles {cfg}: skipped ({type(exc).__name__})", file=sys.stderr)
                continue
            if err < 1e-2:
                swept[json.dumps(dataclasses.asdict(cfg))] = us
        if swept:
            best = min(swept, key=swept.get)
            row["expanded_swept_us"], row["expanded_swept_tiles"] = swept[best], json.loads(best)
            row["expanded_swept_of_peak"] = work["expanded_kernel"] / swept[best] / 1e6 / peak
    return row, swept


def crossover_len(rows: list[dict]) -> float | None:
    """Prompt length (B = 1) where expanded / absorbed time crosses 1, log-interpolated; the
    shortest length measured if expanded already wins there, None if it never wins."""
    ones = sorted((r["length"], r["expanded_us"] / r["absorbed_us"]) for r in rows if r["batch"] == 1)
    if not ones or all(ratio >= 1 for _, ratio in ones):
        return None
    if ones[0][1] < 1:
        return float(ones[0][0])
    for (l0, r0), (l1, r1) in zip(ones, ones[1:]):
        if r0 >= 1 > r1:
            f = math.log(r0) / (math.log(r0) - math.log(r1))
            return math.exp(math.log(l0) + f * (math.log(l1) - math.log(l0)))
    return None


def table(rows: list[dict], peak: float) -> str:
    lines = [f"bf16 matmul peak {peak:.0f} TFLOP/s (8192^3, same run)",
             "| B | L | absorbed ms | of peak | abs. kernel ms | of peak | expanded ms | of peak | exp. kernel ms | "
             "TFLOP/s | of peak | absorbed / expanded | swept exp. kernel (tiles, of peak) |", "|" + "---|" * 13]
    for r in rows:
        sw = (f"{r['expanded_swept_us'] / 1e3:.3f} ({tuple(r['expanded_swept_tiles'].values())}, "
              f"{r['expanded_swept_of_peak']:.2f})" if "expanded_swept_us" in r else "-")
        lines.append(f"| {r['batch']} | {r['length']} | {r['absorbed_us'] / 1e3:.3f} | {r['absorbed_of_peak']:.2f} | "
                     f"{r['absorbed_kernel_us'] / 1e3:.3f} | {r['absorbed_kernel_of_peak']:.2f} | "
                     f"{r['expanded_us'] / 1e3:.3f} | {r['expanded_of_peak']:.2f} | "
                     f"{r['expanded_kernel_us'] / 1e3:.3f} | {r['expanded_kernel_TFLOPs']:.0f} | "
                     f"{r['expanded_kernel_of_peak']:.2f} | {r['absorbed_us'] / r['expanded_us']:.2f} | {sw} |")
    return "\n".join(lines)


def write_config(rows: list[dict], swept: list[dict], a, device: str) -> Path | None:
    """The tiles with the least total time over every case (each case's own best may differ)."""
    runs = [s for s in swept if s]
    common = set.intersection(*(set(s) for s in runs)) if runs else set()
    if not common:
        return None
    best = mpc.MLAPrefillConfig(**json.loads(min(common, key=lambda k: sum(s[k] for s in runs))))
    path = mpc.config_path(device.replace(" ", "_").replace("/", "_"), a.heads, a.nope + a.rope, a.v)
    if a.config_dir:
        path = Path(a.config_dir) / path.name
    meta = {"dtype": str(DTYPE).split(".")[-1], "tool": "scripts/bench_mla_prefill.py --sweep --write-config",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "timings_us": {f"B{r['batch']}_L{r['length']}": {"default": r["expanded_kernel_us"],
                                                            "swept": r.get("expanded_swept_us")} for r in rows}}
    mpc.save_config(path, best, meta)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=2 if SMOKE else 128)
    ap.add_argument("--latent", type=int, default=32 if SMOKE else 512, help="kv_lora_rank")
    ap.add_argument("--rope", type=int, default=16 if SMOKE else 64, help="qk_rope_head_dim")
    ap.add_argument("--nope", type=int, default=16 if SMOKE else 128, help="qk_nope_head_dim")
    ap.add_argument("--v", type=int, default=16 if SMOKE else 128, help="v_head_dim")
    ap.add_argument("--sweep", action="store_true", help="time the expanded kernel's tile shapes too")
    ap.add_argument("--write-config", action="store_true", help="store the swept tiles for this GPU")
    ap.add_argument("--config-dir", default="", help="where --write-config writes (default: server/kernels/configs)")
    ap.add_argument("--out", default="gpu_out/mla_prefill.json", help="JSON results")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny shapes under Triton's interpreter")
    a = ap.parse_args()
    a.sweep = a.sweep or a.write_config or SMOKE
    peak = matmul_peak()
    rows, swept = [], []
    for batch, length in CASES:
        row, times = measure(batch, length, a.heads, peak, a)
        rows.append(row)
        swept.append(times)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        print(f"B={batch} L={length}: absorbed {row['absorbed_us']:.0f} us, expanded {row['expanded_us']:.0f} us "
              f"(kernel {row['expanded_kernel_us']:.0f} us)", file=sys.stderr)
    bad = [r for r in rows if max(r[f"{p}_rel_err"] for p in ("absorbed", "expanded", "expanded_kernel")) > 1e-2]
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter)"
    cross = crossover_len(rows)
    at_4096 = [r["expanded_kernel_of_peak"] for r in rows if r["length"] == 4096]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "dtype": str(DTYPE), "page": PAGE, "matmul_TFLOPs": peak,
                               "crossover_len": cross, "threshold_now": mpc.EXPANDED_MIN_QUERIES_PER_KEY,
                               "rows": rows}, indent=1))
    print(f"{device}, {DTYPE}, page {PAGE}, {a.heads} heads")
    print(table(rows, peak))
    print(f"crossover_len (B=1): {cross if cross is None else round(cross)} tokens "
          f"(EXPANDED_MIN_QUERIES_PER_KEY now {mpc.EXPANDED_MIN_QUERIES_PER_KEY})")
    if at_4096:
        print(f"expanded kernel at L=4096: {min(at_4096):.2f} of the bf16 matmul peak (target 0.50)")
    if a.write_config and not bad:
        print(f"stored the expanded kernel's tiles in {write_config(rows, swept, a, device.split(' (')[0])}")
    print(f"{len(rows)} cases; {len(bad)} failed checks")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
