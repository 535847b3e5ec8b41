"""Kernel-vs-twin checks for the block-FP8 MoE kernels, shared by the interpreter and GPU tests.

Every buffer the kernels allocate starts poisoned (NaN / POISON_INT) and so does the output;
weights start as random floats quantised to the checkpoint format (e4m3 + one fp32 scale per
128x128 block). The twin (moe_reference_fp8) quantises where the kernels do, so tolerances
stay far below the FP8 quantisation error itself (~3e-2): a missed scale, a wrong scale block
or a K step straddling two blocks lands above them.

    python -m tests.kernels.support.fp8_checks '<json list of [case, kwargs]>'   (prints JSON)
"""
from __future__ import annotations

import json
import sys

import torch

from tests.kernels.support.checks import DTYPES, make_moe_routing, rel_err

# fp32 activations: summation order only; bf16: one rounding of the output (as the bf16 checks)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def fp8_weights(num_experts: int, hidden: int, inter: int, device, seed: int = 0):
    """(w13, w13_s, w2, w2_s): [E, 2I, H] / [E, H, I] e4m3 with their block scales."""
    from server.moe.kernels.moe_reference_fp8 import quantize_weight_blocks

    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=device) * inter ** -0.5
    w13 = w13 * torch.logspace(-1, 1, 2 * inter, device=device)[None, :, None]  # scale blocks that differ
    return (*quantize_weight_blocks(w13), *quantize_weight_blocks(w2))


def _cfg(block_m, block_n, block_k):
    """The given tiles, or None (block_m=None): the pipeline's own config lookup."""
    from server.moe.kernels.moe_config import GemmConfig, MoEConfig

    if block_m is None:
        return None
    g = GemmConfig(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=2)
    return MoEConfig(block_m, g, g)


def _result(name: str, err: float, dtype: torch.dtype, ok: bool = True, **extra) -> dict:
    tol = TOLERANCE[dtype]
    return {"check": name, "rel_err": err, "tol": tol, "ok": bool(ok and err <= tol), **extra}


def check_quantize(rows=37, k=300, dtype="float32", valid=20, seed=0, device="cpu") -> dict:
    """Codes and scales of the quantise kernel equal the twin's; rows past `valid` stay unwritten."""
    from server.kernels import workspace
    from server.moe.kernels.fp8_quant import quantize_rows_fp8, quantize_rows_reference

    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=gen) * torch.logspace(-4, 3, k)).to(device=device, dtype=DTYPES[dtype])
    x[1] = 0  # an all-zero row keeps a finite scale
    workspace.set_poison(True)
    q, s = quantize_rows_fp8(x)
    rq, rs = quantize_rows_reference(x)
    nv = torch.tensor([valid], dtype=torch.int32, device=device)
    q2, s2 = quantize_rows_fp8(x, nv)
    workspace.set_poison(False)
    same = torch.equal(q.float(), rq.float()) and torch.equal(s, rs)
    partial = torch.equal(q2[:valid].float(), rq[:valid].float()) and bool(s2[valid:].isnan().all())
    return {"check": "quantize", "ok": bool(same and partial), "same": same, "partial": partial}


def check_fused_moe_fp8(num_tokens=9, top_k=3, num_experts=5, hidden=160, inter=144, dtype="float32",
                        skip_frac=0.2, block_m=16, block_n=32, block_k=64, seed=0, device="cpu") -> dict:
    from server.kernels import workspace
    from server.moe.kernels.fused_moe_fp8 import fused_moe_fp8_triton
    from server.moe.kernels.moe_reference_fp8 import fused_moe_fp8_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    workspace.set_poison(True)
    weights = fp8_weights(num_experts, hidden, inter, dev, seed)
    x, ids, w = make_moe_routing(num_tokens, hidden, num_experts, top_k, dt, dev, seed + 1, skip_frac)
    out = torch.full_like(x, float("nan"))
    fused_moe_fp8_triton(x, *weights, ids, w, config=_cfg(block_m, block_n, block_k), out=out)
    workspace.set_poison(False)
    ref = fused_moe_fp8_reference(x, *weights, ids, w)
    return _result("fused_moe_fp8", rel_err(out, ref), dt, hidden=hidden, inter=inter, block_k=block_k)


def check_grouped_fp8(counts=(5, 0, 19, 1), hidden=160, inter=144, dtype="float32", block_m=16, block_n=32,
                      block_k=128, seed=0, device="cpu") -> dict:
    """EP layout: rows grouped by expert (some experts empty); rows past the last run stay unwritten."""
    from server.kernels import workspace
    from server.moe.kernels.fused_moe_fp8 import grouped_expert_mlp_fp8_triton
    from server.moe.kernels.moe_reference_fp8 import grouped_expert_mlp_fp8_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    workspace.set_poison(True)
    weights = fp8_weights(len(counts), hidden, inter, dev, seed)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    used, spare = int(offsets[-1]), 3  # the buffer holds spare rows no expert owns
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(used + spare, hidden, generator=gen).to(device=dev, dtype=dt)
    out = torch.full_like(x, float("nan"))
    grouped_expert_mlp_fp8_triton(x, offsets, *weights, config=_cfg(block_m, block_n, block_k), out=out)
    workspace.set_poison(False)
    ref = grouped_expert_mlp_fp8_reference(x, offsets, *weights)
    untouched = bool(out[used:].isnan().all())
    return _result("grouped_fp8", rel_err(out[:used], ref[:used]), dt, ok=untouched, untouched=untouched)


def check_expert_rows_fp8(num_rows=23, num_experts=5, hidden=96, inter=80, dtype="float32", block_m=16,
                          block_n=32, block_k=32, seed=0, device="cpu") -> dict:
    """Rows in any order, some with id -1 (not computed: must stay NaN), some experts with no rows."""
    from server.kernels import workspace
    from server.moe.kernels.fused_moe_fp8 import expert_mlp_rows_fp8_triton
    from server.moe.kernels.moe_reference_fp8 import expert_rows_fp8_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    workspace.set_poison(True)
    weights = fp8_weights(num_experts, hidden, inter, dev, seed)
    gen = torch.Generator().manual_seed(seed + 3)
    x = torch.randn(num_rows, hidden, generator=gen).to(device=dev, dtype=dt)
    ids = torch.randint(0, max(num_experts - 2, 1), (num_rows,), generator=gen)  # the last two experts get none
    ids[::5] = -1
    ids = ids.to(dev)
    out = torch.full_like(x, float("nan"))
    expert_mlp_rows_fp8_triton(x, ids, *weights, config=_cfg(block_m, block_n, block_k), out=out)
    workspace.set_poison(False)
    ref = expert_rows_fp8_reference(x, ids, *weights)
    live = ids >= 0
    untouched = bool(out[~live].isnan().all())
    return _result("expert_rows_fp8", rel_err(out[live], ref[live]), dt, ok=untouched, untouched=untouched)


CASES = {"quantize": check_quantize, "fused_moe_fp8": check_fused_moe_fp8, "grouped_fp8": check_grouped_fp8,
         "expert_rows_fp8": check_expert_rows_fp8}


def run_cases(cases: list) -> list[dict]:
    return [{**CASES[name](**kwargs), "case": name, "kwargs": kwargs} for name, kwargs in cases]


if __name__ == "__main__":
    print(json.dumps(run_cases(json.loads(sys.argv[1]))))
