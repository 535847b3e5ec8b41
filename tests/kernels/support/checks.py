"""Kernel-vs-torch checks shared by the CPU interpreter tests and the GPU tests (tests/kernels).

Each check draws fresh random inputs (never zeros), poisons every buffer the kernels
allocate and the output (NaN / POISON_INT, see server/kernels/workspace.py), runs the Triton path, and
compares it with the torch twin evaluated on upcast inputs (float64 on CPU; float32 on the
GPU, where float64 matmuls are slow) by ||out - ref|| / ||ref||. A NaN anywhere = failure.

Run one check under the interpreter: python -m tests.kernels.support.checks <name> '<json kwargs>'
(prints one JSON line; interpret.run_in_interpreter does this from tests).
"""
from __future__ import annotations

import json
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Acceptance bounds on relative error: fp32 near 1e-5, 16-bit below 1e-2 (one rounding of the output).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-300))


def _result(name: str, err: float, dtype: torch.dtype, **extra) -> dict:
    tol = TOLERANCE[dtype]
    return {"check": name, "rel_err": err, "tol": tol, "ok": bool(err <= tol), "dtype": str(dtype).split(".")[-1],
            **extra}


def ref_dtype_for(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


# ----------------------------------------------------------------------------- MoE inputs
def random_topk(num_tokens: int, num_experts: int, top_k: int, skip_frac: float, gen: torch.Generator,
                device) -> torch.Tensor:
    """[T, k] int32 distinct experts per token; a fraction of slots set to -1 (other rank)."""
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    ids = scores.topk(top_k, dim=1).indices.to(torch.int32)
    if skip_frac > 0:
        ids[torch.rand(num_tokens, top_k, generator=gen) < skip_frac] = -1
    return ids.to(device)


def make_moe_weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device, seed: int = 0):
    """w13 [E, 2I, H], w2 [E, H, I] scaled so activations stay O(1)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device, dtype=dtype) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=device, dtype=dtype) * inter ** -0.5
    return w13, w2


def make_moe_routing(num_tokens: int, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype, device,
                     seed: int = 1, skip_frac: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    ids = random_topk(num_tokens, num_experts, top_k, skip_frac, gen, device)
    weights = torch.rand(num_tokens, top_k, generator=gen).to(device)
    weights = weights / weights.sum(1, keepdim=True)
    return x, ids, weights


def _config(block_m, block_n, block_k, num_warps=4, num_stages=2):
    from server.moe.kernels.moe_config import GemmConfig, MoEConfig

    if block_m is None:
        return None
    g = GemmConfig(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return MoEConfig(block_m, g, g)


# ----------------------------------------------------------------------------- MoE checks
def align_reference(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[list[int], list[int]]:
    """Stable expert grouping of flat slots, padded per expert with the sentinel N."""
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    sorted_ids, block_expert = [], []
    for e in range(num_experts):
        slots = [i for i, x in enumerate(flat) if x == e]
        if not slots:
            continue
        padded = -(-len(slots) // block_m) * block_m
        sorted_ids += slots + [n] * (padded - len(slots))
        block_expert += [e] * (padded // block_m)
    return sorted_ids, block_expert


def check_align(num_tokens=9, top_k=3, num_experts=6, block_m=16, chunk=32, skip_frac=0.2, seed=0,
                device="cpu") -> dict:
    from server.kernels import workspace
    from server.moe.kernels.moe_align import moe_align_block_size

    workspace.set_poison(True)
    gen = torch.Generator().manual_seed(seed)
    ids = random_topk(num_tokens, num_experts, top_k, skip_frac, gen, device)
    al = moe_align_block_size(ids, num_experts, block_m, chunk=chunk)
    want_sorted, want_blocks = align_reference(ids.cpu(), num_experts, block_m)
    used = int(al.num_padded.item())
    got_blocks = al.block_expert.tolist()
    ok = (used == len(want_sorted) and al.sorted_ids[:used].tolist() == want_sorted
          and got_blocks[: len(want_blocks)] == want_blocks and all(b == -1 for b in got_blocks[len(want_blocks):]))
    return {"check": "align", "ok": ok, "num_padded": used, "want_padded": len(want_sorted),
            "max_blocks": al.max_blocks}


def check_align_offsets(counts=(3, 0, 17, 1, 16), block_m=16, device="cpu") -> dict:
    from server.kernels import workspace
    from server.moe.kernels.moe_align import align_from_offsets

    workspace.set_poison(True)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device)
    num_rows = int(offsets[-1])
    al = align_from_offsets(offsets, num_rows, block_m)
    want_sorted, want_blocks = [], []
    for e, c in enumerate(counts):
        if c:
            padded = -(-c // block_m) * block_m
            want_sorted += list(range(int(offsets[e]), int(offsets[e]) + c)) + [num_rows] * (padded - c)
            want_blocks += [e] * (padded // block_m)
    used = int(al.num_padded.item())
    got_blocks = al.block_expert.tolist()
    ok = (used == len(want_sorted) and al.sorted_ids[:used].tolist() == want_sorted
          and got_blocks[: len(want_blocks)] == want_blocks and all(b == -1 for b in got_blocks[len(want_blocks):]))
    return {"check": "align_offsets", "ok": ok, "num_padded": used, "want_padded": len(want_sorted)}


def check_fused_moe(num_tokens=7, top_k=3, num_experts=5, hidden=64, inter=48, dtype="float32", skip_frac=0.2,
                    block_m=16, block_n=32, block_k=32, seed=0, device="cpu", weights=None) -> dict:
    from server.kernels import workspace
    from server.moe.kernels.fused_moe import fused_moe_triton
    from server.moe.kernels.moe_reference import moe_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    workspace.set_poison(True)
    w13, w2 = weights if weights is not None else make_moe_weights(num_experts, hidden, inter, dt, dev, seed)
    x, ids, w = make_moe_routing(num_tokens, hidden, num_experts, top_k, dt, dev, seed + 1, skip_frac)
    out = torch.full_like(x, float("nan"))
    fused_moe_triton(x, w13, w2, ids, w, config=_config(block_m, block_n, block_k), out=out)
    rd = ref_dtype_for(dev)
    ref = moe_reference(x.to(rd), w13.to(rd), w2.to(rd), ids, w.to(rd))
    workspace.set_poison(False)
    return _result("fused_moe", rel_err(out, ref), dt, tokens=num_tokens, experts=num_experts)


def check_grouped_mlp(counts=(5, 0, 19, 1), hidden=64, inter=48, dtype="float32", block_m=16, block_n=32,
                      block_k=32, seed=0, device="cpu", weights=None) -> dict:
    from server.kernels import workspace
    from server.moe.kernels.fused_moe import grouped_expert_mlp_triton
    from server.moe.kernels.moe_reference import grouped_expert_mlp_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    workspace.set_poison(True)
    num_experts = len(counts)
    w13, w2 = weights if weights is not None else make_moe_weights(num_experts, hidden, inter, dt, dev, seed)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(int(offsets[-1]), hidden, generator=gen).to(device=dev, dtype=dt)
    out = torch.full_like(x, float("nan"))
    grouped_expert_mlp_triton(x, offsets, w13, w2, config=_config(block_m, block_n, block_k), out=out)
    rd = ref_dtype_for(dev)
    ref = grouped_expert_mlp_reference(x.to(rd), offsets, w13.to(rd), w2.to(rd))
    workspace.set_poison(False)
    return _result("grouped_mlp", rel_err(out, ref), dt, rows=int(offsets[-1]))


def check_expert_rows(num_rows=23, num_experts=5, hidden=64, inter=48, dtype="float32", block_m=16, block_n=32,
                      block_k=32, seed=0, device="cpu") -> dict:
    from server.kernels import workspace
    from server.moe.kernels.fused_moe import expert_mlp_rows_triton
    from server.moe.kernels.moe_reference import expert_mlp_rows_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    workspace.set_poison(True)
    w13, w2 = make_moe_weights(num_experts, hidden, inter, dt, dev, seed)
    gen = torch.Generator().manual_seed(seed + 3)
    x = torch.randn(num_rows, hidden, generator=gen).to(device=dev, dtype=dt)
    ids = torch.randint(0, num_experts, (num_rows,), generator=gen).to(dev)
    out = torch.full_like(x, float("nan"))
    expert_mlp_rows_triton(x, ids, w13, w2, config=_config(block_m, block_n, block_k), out=out)
    rd = ref_dtype_for(dev)
    ref = expert_mlp_rows_reference(x.to(rd), ids, w13.to(rd), w2.to(rd))
    workspace.set_poison(False)
    return _result("expert_rows", rel_err(out, ref), dt, rows=num_rows)


# ----------------------------------------------------------------------------- attention
def make_paged_inputs(q_lens, ctx_lens, q_heads, kv_heads, head_dim, block_size, dtype, device, seed=0,
                      spare_blocks=3):
    """Random q [T, Hq, D], caches with shuffled block ids (spare blocks random too), block tables
    padded with -1, cu_seqlens [S+1] and context_lens [S] (int32)."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(need + [1])
    tables = torch.full((len(ctx_lens), width), -1, dtype=torch.int32)
    start = 0
    for s, n in enumerate(need):
        tables[s, :n] = torch.tensor(perm[start : start + n], dtype=torch.int32)
        start += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), q_heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, k_cache, v_cache, tables, cu, ctx))


def check_decode(ctx_lens=(1, 17, 70, 33), q_heads=4, kv_heads=2, head_dim=32, block_size=8, dtype="float32",
                 num_splits=None, block_n=16, seed=0, device="cpu") -> dict:
    from server.kernels import workspace
    from server.kernels.attention_decode import paged_decode_attention_triton
    from server.kernels.attention_reference import paged_decode_attention_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    workspace.set_poison(True)
    q, kc, vc, bt, _, ctx = make_paged_inputs([1] * len(ctx_lens), list(ctx_lens), q_heads, kv_heads, head_dim,
                                              block_size, dt, dev, seed)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention_triton(q, kc, vc, bt, ctx, num_splits=num_splits, out=out, block_n=block_n)
    rd = ref_dtype_for(dev)
    ref = paged_decode_attention_reference(q.to(rd), kc.to(rd), vc.to(rd), bt, ctx)
    workspace.set_poison(False)
    return _result("decode", rel_err(out, ref), dt, num_splits=num_splits)


def check_prefill(q_lens=(5, 1, 19, 0), prefix_lens=(0, 9, 13, 4), q_heads=4, kv_heads=2, head_dim=32,
                  block_size=8, dtype="float32", block_m=16, block_n=16, seed=0, device="cpu") -> dict:
    from server.kernels import workspace
    from server.kernels.attention_prefill import prefill_attention_triton
    from server.kernels.attention_reference import prefill_attention_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    workspace.set_poison(True)
    ctx_lens = [a + b for a, b in zip(q_lens, prefix_lens)]
    q, kc, vc, bt, cu, ctx = make_paged_inputs(list(q_lens), ctx_lens, q_heads, kv_heads, head_dim, block_size,
                                               dt, dev, seed)
    out = torch.full_like(q, float("nan"))
    prefill_attention_triton(q, kc, vc, bt, cu, ctx, max_query_len=max(q_lens), out=out, block_m=block_m,
                             block_n=block_n)
    rd = ref_dtype_for(dev)
    ref = prefill_attention_reference(q.to(rd), kc.to(rd), vc.to(rd), bt, cu, ctx)
    workspace.set_poison(False)
    return _result("prefill", rel_err(out, ref), dt, tokens=int(cu[-1]))


def check_write_kv(num_tokens=6, kv_heads=2, head_dim=16, block_size=4, num_blocks=5, dtype="bfloat16",
                   seed=0, device="cpu") -> dict:
    from server.kernels.attention_decode import write_kv_cache_triton
    from server.kernels.attention_reference import write_kv_cache

    dt, dev = DTYPES[dtype], torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int64)
    slots[1] = -1  # a padding token
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dt)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen).to(dt)
    base_k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dt)
    base_v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dt)
    kc, vc = base_k.clone().to(dev), base_v.clone().to(dev)
    rk, rv = base_k.clone(), base_v.clone()  # the torch twin runs on the CPU copies
    write_kv_cache_triton(k.to(dev), v.to(dev), kc, vc, slots.to(dev))
    write_kv_cache(k, v, rk, rv, slots)
    ok = torch.equal(kc.cpu(), rk.cpu()) and torch.equal(vc.cpu(), rv.cpu())
    return {"check": "write_kv", "ok": bool(ok)}


CHECKS = {
    "align": check_align,
    "align_offsets": check_align_offsets,
    "fused_moe": check_fused_moe,
    "grouped_mlp": check_grouped_mlp,
    "expert_rows": check_expert_rows,
    "decode": check_decode,
    "prefill": check_prefill,
    "write_kv": check_write_kv,
}


def main(argv: list[str]) -> None:
    from tests.kernels.support.interpret import enable_interpreter
    from tests.kernels.support.mla_checks import MLA_CHECKS

    CHECKS.update(MLA_CHECKS)

    name = argv[0]
    params = json.loads(argv[1]) if len(argv) > 1 else {}
    if name not in CHECKS:
        raise SystemExit(f"unknown check {name!r}; known: {sorted(CHECKS)}")
    enable_interpreter()
    for key in ("counts", "ctx_lens", "q_lens", "prefix_lens"):
        if key in params:
            params[key] = tuple(params[key])
    print(json.dumps(CHECKS[name](**params)))


if __name__ == "__main__":
    main(sys.argv[1:])
