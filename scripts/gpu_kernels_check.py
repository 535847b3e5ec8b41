#!/usr/bin/env python
"""Check and time every epserve GPU kernel against torch at real shapes; one run, one table.

Run on the GPU machine from the repo root (torch 2.11 + triton 3.6, ~3 min on an H100):
    OUT=./gpu_out python scripts/gpu_kernels_check.py            # all sections
    python scripts/gpu_kernels_check.py --sections moe --tokens 128 8192

Sections (Qwen3-30B-A3B shapes: H=2048, E=128, top-8, I=768; 32 q / 4 kv heads, head_dim 128):
  ceilings  measured copy bandwidth (1 GiB device copy, read+write bytes) and bf16 matmul rate
  moe       fused_moe at T in {1,8,64,128,512,2048,8192}: Triton vs torch reference (expert loop)
            vs torch._grouped_mm pipeline; CUDA-graph replay time for T <= 512; HBM bandwidth on
            the expert weights read (all T) and TFLOP/s (all T); stage breakdown at 128 / 8192
  ep        grouped_expert_mlp on dispatched rows, 32 local experts (EP4), Triton vs grouped_mm
  graph     fused_moe + decode attention captured in a CUDA graph, replayed on new inputs
  decode    paged decode attention (page 16): Triton vs gather + SDPA
  prefill   varlen causal prefill over the paged cache: Triton vs padded SDPA on contiguous K/V
Every check: fresh random inputs, poisoned buffers, ||out-ref||/||ref|| against float32 math.
Timing: triton.testing.do_bench median (L2 flushed between runs). Writes $OUT/gpu_kernels_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SMOKE = "--smoke-cpu" in sys.argv  # CPU dry run of this script under Triton's interpreter, tiny shapes
if SMOKE:
    from server.moe.kernels.interpret import enable_interpreter

    enable_interpreter()  # must precede the first triton import

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from server.kernels import workspace  # noqa: E402
from server.kernels.attention_decode import paged_decode_attention_triton  # noqa: E402
from server.kernels.attention_prefill import prefill_attention_triton  # noqa: E402
from server.kernels.attention_reference import gather_kv, paged_decode_attention_reference, prefill_attention_reference  # noqa: E402,E501
from server.moe.kernels.checks import make_moe_routing, make_moe_weights, make_paged_inputs, rel_err  # noqa: E402
from server.moe.kernels.fused_moe import expert_mlp_rows_triton, fused_moe_triton, grouped_expert_mlp_triton  # noqa: E402,E501
from server.moe.kernels.moe_align import moe_align_block_size  # noqa: E402
from server.moe.kernels.moe_config import device_key, get_moe_config  # noqa: E402
from server.moe.kernels.moe_gemm import combine_slots, down_scatter, gate_up_silu  # noqa: E402
from server.moe.kernels.moe_reference import (  # noqa: E402
    grouped_expert_mlp_grouped_mm, grouped_expert_mlp_reference, moe_grouped_mm, moe_reference)

H, E, TOP_K, I = 2048, 128, 8, 768
HQ, HKV, D, PAGE = 32, 4, 128, 16
DEVICE = "cuda"
BREAKDOWN_TOKENS = (128, 8192)
EP_TOKENS = (128, 8192)
DECODE_CASES = ((128, 320), (128, 2048), (8, 16384))  # (sequences, max context)
PREFILL_CASES = ((128, 64, 0), (4, 2048, 0), (16, 256, 768))  # (sequences, new tokens, cached prefix)
if SMOKE:
    H, E, TOP_K, I = 64, 8, 2, 32
    HQ, HKV, D, PAGE = 4, 2, 32, 8
    DEVICE = "cpu"
    BREAKDOWN_TOKENS = EP_TOKENS = (16,)
    DECODE_CASES = ((3, 40),)
    PREFILL_CASES = ((2, 20, 0), (2, 9, 13))
NOMINAL_BW, NOMINAL_TFLOPS = 3.0e12, 790e12  # measured on this workplace's H100s (KINDS.md)
BF16 = torch.bfloat16
ROWS: list[dict] = []  # the table
TOL_BF16 = 1e-2


def bench(fn, rep=100) -> float:
    if SMOKE:  # one call, wall clock: exercises the code path only
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # us


def bench_graph(fn) -> float | None:
    if SMOKE:
        return None
    return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def add_row(section, case, err=None, **cols) -> dict:
    row = {"section": section, "case": case, "rel_err": err, "ok": None if err is None else bool(err <= TOL_BF16)}
    row.update(cols)
    ROWS.append(row)
    return row


def ceilings() -> dict:
    n = 1 << 30
    src = torch.randn(n // 4, device=DEVICE)
    dst = torch.empty_like(src)
    copy_us = bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device=DEVICE, dtype=BF16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=BF16)
    mm_us = bench(lambda: a @ b)
    res = {"copy_GBps": 2 * n / copy_us / 1e3, "matmul_TFLOPs": 2 * 8192 ** 3 / mm_us / 1e6}
    add_row("ceilings", "copy 1GiB / mm 8192^3", None, note=f"{res['copy_GBps'] / 1e3:.2f} TB/s, "
            f"{res['matmul_TFLOPs']:.0f} TFLOP/s bf16")
    del src, dst, a, b
    return res


def moe_inputs(tokens: int, seed: int):
    return make_moe_routing(tokens, H, E, TOP_K, BF16, DEVICE, seed=seed)


def moe_section(tokens: list[int], ceil: dict, w13, w2, w13f, w2f) -> None:
    weight_bytes_per_expert = 3 * H * I * 2
    for t in tokens:
        x, ids, w = moe_inputs(t, seed=100 + t)
        workspace.set_poison(True)
        out = torch.full_like(x, float("nan"))
        fused_moe_triton(x, w13, w2, ids, w, out=out)
        workspace.set_poison(False)
        ref = moe_reference(x.float(), w13f, w2f, ids, w)
        err = rel_err(out, ref)
        err_alt = rel_err(moe_grouped_mm(x, w13, w2, ids, w), ref)
        err_torch = rel_err(moe_reference(x, w13, w2, ids, w), ref)
        us = bench(lambda: fused_moe_triton(x, w13, w2, ids, w))
        graph_us = bench_graph(lambda: fused_moe_triton(x, w13, w2, ids, w)) if t <= 512 else None
        alt_us = bench(lambda: moe_grouped_mm(x, w13, w2, ids, w))
        ref_us = bench(lambda: moe_reference(x, w13, w2, ids, w), rep=50)
        active = int(torch.unique(ids[ids >= 0]).numel())
        wbytes = active * weight_bytes_per_expert
        flops = 2 * int((ids >= 0).sum()) * 3 * H * I
        best = min(us, graph_us or us)
        cfg = get_moe_config(E, H, I, t * TOP_K, BF16)
        add_row("moe", f"T={t}", err, triton_us=us, graph_us=graph_us, torch_ref_us=ref_us, torch_alt_us=alt_us,
                alt="grouped_mm", speedup_vs_alt=alt_us / us, err_alt=err_alt, err_torch_bf16=err_torch,
                active_experts=active, weight_GBps=wbytes / best / 1e3,
                pct_bw_nominal=100 * wbytes / best / 1e-6 / NOMINAL_BW,
                pct_bw_measured=100 * wbytes / best / 1e3 / ceil.get("copy_GBps", float("nan")),
                TFLOPs=flops / best / 1e6, pct_peak_nominal=100 * flops / best / 1e-6 / NOMINAL_TFLOPS,
                pct_peak_measured=100 * flops / best / 1e6 / ceil.get("matmul_TFLOPs", float("nan")),
                config=cfg.to_json(),
                note=(f"W {wbytes / best / 1e3:.0f} GB/s ({100 * wbytes / best / 1e-6 / NOMINAL_BW:.0f}% of 3.0TB/s)"
                      if t <= 512 else f"{flops / best / 1e6:.0f} TFLOP/s "
                      f"({100 * flops / best / 1e-6 / NOMINAL_TFLOPS:.0f}% of 790)"))


def moe_breakdown(t: int, w13, w2) -> None:
    x, ids, w = moe_inputs(t, seed=7 + t)
    cfg = get_moe_config(E, H, I, t * TOP_K, BF16)
    al = moe_align_block_size(ids, E, cfg.BLOCK_M)
    act = gate_up_silu(x, w13, al, cfg.gate_up, row_div=TOP_K)
    slots = torch.empty(t * TOP_K, H, dtype=BF16, device=DEVICE)
    wf = w.reshape(-1).float().contiguous()
    parts = {
        "align": bench(lambda: moe_align_block_size(ids, E, cfg.BLOCK_M)),
        "gate_up": bench(lambda: gate_up_silu(x, w13, al, cfg.gate_up, row_div=TOP_K, act=act)),
        "down": bench(lambda: down_scatter(act, w2, al, cfg.down, slots, wf)),
        "combine": bench(lambda: combine_slots(slots, ids, E)),
    }
    padded = int(al.num_padded.item())
    add_row("moe-parts", f"T={t}", None, **{f"{k}_us": v for k, v in parts.items()}, padded_rows=padded,
            note=" ".join(f"{k} {v:.0f}" for k, v in parts.items()) + f" us; padded rows {padded}/{t * TOP_K}")


def ep_section(w13, w2, w13f, w2f) -> None:
    e_local = E // 4
    for t in EP_TOKENS:
        rows = t * TOP_K // 4
        gen = torch.Generator().manual_seed(t)
        counts = torch.multinomial(torch.ones(e_local), rows, replacement=True, generator=gen).bincount(minlength=e_local)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32).to(DEVICE)
        x = torch.randn(rows, H, device=DEVICE, dtype=BF16)
        lw13, lw2, lw13f, lw2f = w13[:e_local], w2[:e_local], w13f[:e_local], w2f[:e_local]
        workspace.set_poison(True)
        out = torch.full_like(x, float("nan"))
        grouped_expert_mlp_triton(x, offsets, lw13, lw2, out=out)
        workspace.set_poison(False)
        ref = grouped_expert_mlp_reference(x.float(), offsets, lw13f, lw2f)
        us = bench(lambda: grouped_expert_mlp_triton(x, offsets, lw13, lw2))
        alt_us = bench(lambda: grouped_expert_mlp_grouped_mm(x, offsets, lw13, lw2))
        err_alt = rel_err(grouped_expert_mlp_grouped_mm(x, offsets, lw13, lw2), ref)
        flops = 2 * rows * 3 * H * I
        add_row("ep4", f"rows={rows} E_local={e_local}", rel_err(out, ref), triton_us=us, torch_alt_us=alt_us,
                alt="grouped_mm", speedup_vs_alt=alt_us / us, err_alt=err_alt, TFLOPs=flops / us / 1e6,
                note=f"grouped rows: {flops / us / 1e6:.0f} TFLOP/s")
        # The same rows in dispatch order (any order): expert_mlp_rows needs no argsort / permutation.
        perm = torch.randperm(rows, device=DEVICE)
        local_ids = torch.repeat_interleave(torch.arange(e_local, device=DEVICE), counts.to(DEVICE))[perm]
        xr = x[perm].contiguous()
        workspace.set_poison(True)
        out_r = torch.full_like(xr, float("nan"))
        expert_mlp_rows_triton(xr, local_ids, lw13, lw2, out=out_r)
        workspace.set_poison(False)
        us_r = bench(lambda: expert_mlp_rows_triton(xr, local_ids, lw13, lw2))

        def sort_then_grouped_mm():  # what a caller does without expert_mlp_rows
            order = torch.argsort(local_ids, stable=True)
            res = torch.empty_like(xr)
            res[order] = grouped_expert_mlp_grouped_mm(xr[order], offsets, lw13, lw2)
            return res

        alt_r = bench(sort_then_grouped_mm)
        add_row("ep4", f"rows={rows} unsorted", rel_err(out_r, ref[perm]), triton_us=us_r, torch_alt_us=alt_r,
                alt="argsort+grouped_mm", speedup_vs_alt=alt_r / us_r, TFLOPs=flops / us_r / 1e6,
                note=f"expert_mlp_rows: {flops / us_r / 1e6:.0f} TFLOP/s")


def graph_section(w13, w2) -> None:
    """Capture fused_moe and decode attention once, replay on fresh inputs, compare with eager."""
    t = 128
    x, ids, w = moe_inputs(t, seed=1)
    q, kc, vc, bt, _, ctx = make_paged_inputs([1] * t, [300] * t, HQ, HKV, D, PAGE, BF16, DEVICE, seed=2)
    fused_moe_triton(x, w13, w2, ids, w)  # compile before capture
    paged_decode_attention_triton(q, kc, vc, bt, ctx)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        moe_out = fused_moe_triton(x, w13, w2, ids, w)
        attn_out = paged_decode_attention_triton(q, kc, vc, bt, ctx)
    x_new, ids_new, w_new = moe_inputs(t, seed=3)
    x.copy_(x_new)
    ids.copy_(ids_new)
    w.copy_(w_new)
    q.copy_(torch.randn_like(q))
    ctx.copy_(torch.randint(1, 300, ctx.shape, device=DEVICE, dtype=ctx.dtype))
    g.replay()
    torch.cuda.synchronize()
    err_moe = rel_err(moe_out, fused_moe_triton(x, w13, w2, ids, w))
    err_attn = rel_err(attn_out, paged_decode_attention_triton(q, kc, vc, bt, ctx))
    add_row("graph", "replay vs eager, T=128", max(err_moe, err_attn), note=f"moe {err_moe:.1e} attn {err_attn:.1e}")


def sdpa_padded(q4, k4, v4, mask=None, causal=False):
    return torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, is_causal=causal,
                                                            enable_gqa=True)


def decode_section(ceil: dict) -> None:
    for seqs, ctx_len in DECODE_CASES:
        gen = torch.Generator().manual_seed(seqs + ctx_len)
        lens = torch.randint(ctx_len // 2, ctx_len + 1, (seqs,), generator=gen).tolist()
        q, kc, vc, bt, _, ctx = make_paged_inputs([1] * seqs, lens, HQ, HKV, D, PAGE, BF16, DEVICE, seed=seqs)
        workspace.set_poison(True)
        out = torch.full_like(q, float("nan"))
        paged_decode_attention_triton(q, kc, vc, bt, ctx, out=out)
        workspace.set_poison(False)
        ref = paged_decode_attention_reference(q.float(), kc.float(), vc.float(), bt, ctx)
        us = bench(lambda: paged_decode_attention_triton(q, kc, vc, bt, ctx))
        lmax = max(lens)
        pos = torch.arange(lmax, device=DEVICE)

        def torch_alt():  # gather pages -> padded [S, Hkv, L, D], masked SDPA
            blocks = bt[:, (pos // PAGE)].long().clamp_min(0)  # [S, L]
            k4 = kc[blocks, pos % PAGE].transpose(1, 2)
            v4 = vc[blocks, pos % PAGE].transpose(1, 2)
            mask = (pos[None, :] < ctx[:, None])[:, None, None, :]
            return sdpa_padded(q[:, :, None, :], k4, v4, mask)

        alt_us = bench(torch_alt)
        nbytes = sum(lens) * HKV * D * 2 * 2
        add_row("decode", f"S={seqs} ctx<={ctx_len}", rel_err(out, ref), triton_us=us, torch_alt_us=alt_us,
                alt="gather+sdpa", speedup_vs_alt=alt_us / us, kv_GBps=nbytes / us / 1e3,
                pct_bw_measured=100 * nbytes / us / 1e3 / ceil.get("copy_GBps", float("nan")),
                note=f"KV {nbytes / us / 1e3:.0f} GB/s")


def prefill_section() -> None:
    for seqs, q_len, prefix in PREFILL_CASES:
        q, kc, vc, bt, cu, ctx = make_paged_inputs([q_len] * seqs, [q_len + prefix] * seqs, HQ, HKV, D, PAGE, BF16,
                                                   DEVICE, seed=seqs + q_len)
        workspace.set_poison(True)
        out = torch.full_like(q, float("nan"))
        prefill_attention_triton(q, kc, vc, bt, cu, ctx, max_query_len=q_len, out=out)
        workspace.set_poison(False)
        ref = prefill_attention_reference(q.float(), kc.float(), vc.float(), bt, cu, ctx)
        us = bench(lambda: prefill_attention_triton(q, kc, vc, bt, cu, ctx, max_query_len=q_len))
        kv_len = q_len + prefix
        k4 = torch.stack([gather_kv(kc, bt[s], kv_len) for s in range(seqs)]).transpose(1, 2).contiguous()
        v4 = torch.stack([gather_kv(vc, bt[s], kv_len) for s in range(seqs)]).transpose(1, 2).contiguous()
        q4 = q.view(seqs, q_len, HQ, D).transpose(1, 2).contiguous()
        if prefix == 0:
            alt, alt_name = (lambda: sdpa_padded(q4, k4, v4, causal=True)), "sdpa causal (contiguous kv)"
        else:
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(q_len, kv_len)
            alt, alt_name = (lambda: sdpa_padded(q4, k4, v4, mask=bias)), "sdpa lower-right (contiguous kv)"
        try:
            alt_us = bench(alt)
        except Exception as exc:  # a backend may reject the combination; report, don't stop
            alt_us, alt_name = None, f"{alt_name}: {type(exc).__name__}"
        flops = 4 * seqs * HQ * D * q_len * (prefix + (q_len + 1) / 2)
        add_row("prefill", f"S={seqs} q={q_len} prefix={prefix}", rel_err(out, ref), triton_us=us,
                torch_alt_us=alt_us, alt=alt_name, speedup_vs_alt=(alt_us / us) if alt_us else None,
                TFLOPs=flops / us / 1e6, note=f"{flops / us / 1e6:.0f} TFLOP/s")


def fmt(v, spec):
    width = int(spec.split(".")[0]) if spec[0].isdigit() else 0
    return "-".rjust(width) if v is None else format(v, spec)


def print_table() -> None:
    print(f"\n{'section':<9} {'case':<24} {'rel_err':>8} {'ok':>3} {'triton':>9} {'graph':>8} {'torch_ref':>9} "
          f"{'torch_alt':>9} {'x_alt':>6}  note")
    for r in ROWS:
        ok = "-" if r["ok"] is None else ("ok" if r["ok"] else "BAD")
        print(f"{r['section']:<9} {r['case']:<24} {fmt(r['rel_err'], '8.1e')} {ok:>3} {fmt(r.get('triton_us'), '9.1f')} "
              f"{fmt(r.get('graph_us'), '8.1f')} {fmt(r.get('torch_ref_us'), '9.1f')} "
              f"{fmt(r.get('torch_alt_us'), '9.1f')} {fmt(r.get('speedup_vs_alt'), '6.2f')}  {r.get('note', '')}")
    print("times in us (median, do_bench); x_alt = torch_alt / triton; alt = torch._grouped_mm (moe, ep), "
          "gather+SDPA (decode), SDPA on contiguous K/V (prefill)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["ceilings", "moe", "graph", "ep", "decode", "prefill"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 128, 512, 2048, 8192])
    ap.add_argument("--smoke-cpu", action="store_true", help="CPU interpreter dry run at tiny shapes (no timings)")
    args = ap.parse_args()
    if SMOKE:
        args.tokens = [1, 8, 33]
        args.sections = [s for s in args.sections if s not in ("ceilings", "graph")]
    out_dir = Path(os.environ.get("OUT", "./gpu_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    meta = {"device": "cpu interpreter smoke" if SMOKE else torch.cuda.get_device_name(), "device_key": device_key(),
            "torch": torch.__version__,
            "triton": triton.__version__, "shape": {"H": H, "E": E, "top_k": TOP_K, "I": I, "Hq": HQ, "Hkv": HKV,
                                                      "D": D, "page": PAGE}}
    print(f"# {meta['device']} torch {meta['torch']} triton {meta['triton']}", flush=True)
    ceil: dict = {}
    w13 = w2 = w13f = w2f = None
    errors = []
    for section in args.sections:
        t0 = time.time()
        try:
            if section == "ceilings":
                ceil = ceilings()
            elif section in ("moe", "ep", "graph"):
                if w13 is None:
                    w13, w2 = make_moe_weights(E, H, I, BF16, DEVICE, seed=0)
                    w13f, w2f = w13.float(), w2.float()
                if section == "moe":
                    moe_section(args.tokens, ceil, w13, w2, w13f, w2f)
                    for t in BREAKDOWN_TOKENS:
                        moe_breakdown(t, w13, w2)
                elif section == "ep":
                    ep_section(w13, w2, w13f, w2f)
                else:
                    graph_section(w13, w2)
            elif section == "decode":
                decode_section(ceil)
            elif section == "prefill":
                prefill_section()
            else:
                raise ValueError(f"unknown section {section}")
            if DEVICE == "cuda":
                torch.cuda.synchronize()  # surface asynchronous launch errors inside this section
        except Exception as exc:
            traceback.print_exc()
            errors.append(f"{section}: {type(exc).__name__}: {exc}")
            add_row(section, "ERROR", None, note=f"{type(exc).__name__}: {str(exc)[:80]}")
        print(f"# section {section} done in {time.time() - t0:.1f}s", flush=True)
    result = {"meta": meta, "ceilings": ceil, "rows": ROWS, "errors": errors, "seconds": time.time() - start}
    (out_dir / "gpu_kernels_check.json").write_text(json.dumps(result, indent=1, default=str))
    print_table()
    bad = [r for r in ROWS if r["ok"] is False]
    print(f"# {len(ROWS)} rows, {len(bad)} failed checks, {len(errors)} section errors, {time.time() - start:.0f}s; "
          f"JSON in {out_dir / 'gpu_kernels_check.json'}")
    return 1 if bad or errors else 0


if __name__ == "__main__":
    sys.exit(main())
