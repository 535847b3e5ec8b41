#!/usr/bin/env python
"""Tune the block-FP8 fused-MoE block sizes on this GPU and write
server/moe/kernels/configs/<device>_E_H_I_fp8.json (read by fp8_config.get_fp8_moe_config).

    OUT=./gpu_out python scripts/tune_moe_fp8.py                    # Qwen3-30B-A3B, ep_size 1
    python scripts/tune_moe_fp8.py --experts 32 --tokens 128 8192    # EP4 local experts

The search, budget, checks and keep-rule are tune_moe.py's (its helpers are reused): per token
bucket and BLOCK_M, the two FP8 GEMMs are timed apart on one alignment and quantised inputs,
then the whole pipeline (both quantisations included) with the chosen and the default config,
and a bucket keeps the tuned config only where it measured faster. Candidates are tune_moe's
with e4m3 tile bytes, BLOCK_K dividing 128 (the scale block) and twice the accumulator
registers (each dot's result is scaled before it is added): on sm_90 that is the line between
spilling and not (tests/kernels/test_fp8_moe_compile_sm90.py). Weights are random bf16
quantised to 128x128 blocks.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_moe as tm  # noqa: E402  (sets up the interpreter check, imports torch and triton)

import torch  # noqa: E402

from server.moe.kernels.fp8_config import default_fp8_config, fp8_config_path  # noqa: E402
from server.moe.kernels.fp8_quant import GROUP, quantize_rows_fp8  # noqa: E402
from server.moe.kernels.fused_moe_fp8 import fused_moe_fp8_triton  # noqa: E402
from server.moe.kernels.moe_align import moe_align_block_size  # noqa: E402
from server.moe.kernels.moe_config import MoEConfig  # noqa: E402
from server.moe.kernels.moe_gemm_fp8 import down_scatter_fp8, gate_up_silu_fp8  # noqa: E402
from server.moe.kernels.moe_reference_fp8 import quantize_weight_blocks  # noqa: E402
from server.moe.kernels.tuned_table import BucketResult  # noqa: E402


def fp8_candidates(block_m: int, accumulators: int) -> list:
    return [c for c in tm.gemm_candidates(block_m, accumulators, elem_bytes=1, reg_factor=2) if GROUP % c.BLOCK_K == 0]


def fp8_weights(args) -> tuple[torch.Tensor, ...]:
    """(w13, w13_s, w2, w2_s) e4m3 + block scales, quantised one expert at a time."""
    out = []
    for w in tm.moe_weights(args.experts, args.hidden, args.inter, torch.bfloat16, args.device):
        parts = [quantize_weight_blocks(w[e]) for e in range(w.shape[0])]
        out += [torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])]
    return tuple(out)


def tune_bucket(tokens: int, args, weights, deadline: float) -> BucketResult:
    w13, w13_s, w2, w2_s = weights
    x, ids, w = tm.moe_routing(tokens, args.hidden, args.experts, args.top_k, torch.bfloat16, args.device, seed=tokens)
    wf = w.reshape(-1).float().contiguous()  # [T*k]
    slots = torch.empty(tokens * args.top_k, args.hidden, dtype=x.dtype, device=args.device)  # [T*k, H]
    rows = tokens * args.top_k
    default = default_fp8_config(rows, args.experts)
    xq, xs = quantize_rows_fp8(x)  # [T, H] e4m3, [T, ceil(H/128)]
    results = []
    for bm in dict.fromkeys([*tm.block_m_candidates(rows / args.experts), default.BLOCK_M]):
        al = moe_align_block_size(ids, args.experts, bm)
        align_us = tm.bench(lambda: moe_align_block_size(ids, args.experts, bm), args.rep_ms)
        act = torch.empty(al.sorted_ids.numel(), args.inter, dtype=x.dtype, device=args.device)  # [max_padded, I]
        gate_up_silu_fp8(xq, xs, w13, w13_s, al, default.gate_up, args.top_k, act)
        aq, a_s = quantize_rows_fp8(act, al.num_padded)
        first = bm == default.BLOCK_M
        gu, gu_us, n_gu = tm.best_of("gate_up", tm.with_default(first, default.gate_up, fp8_candidates(bm, 2)),
                                     lambda c: gate_up_silu_fp8(xq, xs, w13, w13_s, al, c, args.top_k, act),
                                     args.rep_ms, deadline)
        dn, dn_us, n_dn = tm.best_of("down", tm.with_default(first, default.down, fp8_candidates(bm, 1)),
                                     lambda c: down_scatter_fp8(aq, a_s, w2, w2_s, al, c, slots, wf),
                                     args.rep_ms, deadline)
        results.append((align_us + gu_us + dn_us, MoEConfig(bm, gu, dn),
                        {"align_us": align_us, "gate_up_us": gu_us, "down_us": dn_us, "tried": n_gu + n_dn}))
        print(f"  T={tokens} BLOCK_M={bm}: align {align_us:.1f} + gate_up {gu_us:.1f} + down {dn_us:.1f} us "
              f"({n_gu}+{n_dn} candidates)", flush=True)
    _, cfg, parts = min(results, key=lambda r: r[0])
    run = lambda c: fused_moe_fp8_triton(x, *weights, ids, w, config=c)  # noqa: E731
    agreement = tm.rel_err(run(cfg), run(default).float())
    if agreement > 1e-2:
        raise RuntimeError(f"T={tokens}: tuned config {cfg} disagrees with the default config (rel err {agreement:.2e})")
    tuned_us = tm.bench(lambda: run(cfg), args.rep_ms * 2)
    default_us = tm.bench(lambda: run(default), args.rep_ms * 2)
    return BucketResult(tuned=cfg, default=default, tuned_us=tuned_us, default_us=default_us, parts=parts)


def main() -> int:
    args = tm.make_parser(__doc__).parse_args()
    name = tm.setup(args)
    start = time.time()
    deadline = start + args.budget_s
    print(f"# tuning FP8 E={args.experts} H={args.hidden} I={args.inter} top_k={args.top_k} on {name}", flush=True)
    weights = fp8_weights(args)
    results = {t: tune_bucket(t, args, weights, deadline) for t in args.tokens}
    tm.write_results(results, args, name, "float8_e4m3fn weights, bfloat16 activations",
                     fp8_config_path(name, args.experts, args.hidden, args.inter), start, deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
