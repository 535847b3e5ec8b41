"""MLA kernel-vs-torch checks (latent-cache decode, prefill, row write), in the style of checks.py:
fresh random inputs, poisoned workspaces, the torch twin on upcast inputs, relative error.
Run under the interpreter through checks.py's entry point (`mla_decode`, `mla_prefill`, `mla_write`):
python -m tests.kernels.support.checks mla_decode '<json kwargs>'."""
from __future__ import annotations

import torch

from tests.kernels.support.checks import DTYPES, _result, ref_dtype_for, rel_err


def make_latent_inputs(q_lens, ctx_lens, heads, v_dim, rope_dim, block_size, dtype, device, seed=0, spare_blocks=3):
    """q [T, H, Dk], a latent cache with shuffled block ids (spare blocks random too), block tables
    padded with -1, cu_seqlens [S+1], context_lens [S] (int32). Scaled so scores stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    dk = v_dim + rope_dim
    need = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(ctx_lens), max(need + [1])), -1, dtype=torch.int32)
    start = 0
    for s, n in enumerate(need):
        tables[s, :n] = torch.tensor(perm[start:start + n], dtype=torch.int32)
        start += n
    cache = torch.randn(num_blocks, block_size, dk, generator=gen).to(dtype)
    q = (torch.randn(sum(q_lens), heads, dk, generator=gen) * dk ** -0.25).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, cache, tables, cu, ctx))


def poison_unused_rows(cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> int:
    """NaN into every cache row no sequence's context covers (the tails of last pages, spare
    blocks): a kernel that lets one of them into its sums returns NaN. Returns the rows poisoned."""
    page = cache.shape[1]
    used = torch.zeros(cache.shape[0] * page, dtype=torch.bool)
    for s, n in enumerate(context_lens.tolist()):
        pos = torch.arange(n)
        used[block_tables[s].cpu().long()[pos // page] * page + pos % page] = True
    cache.view(-1, cache.shape[2])[(~used).to(cache.device)] = float("nan")
    return int((~used).sum())


def check_mla_decode(ctx_lens=(1, 17, 70, 33), heads=4, v_dim=32, rope_dim=16, block_size=8, dtype="float32",
                     num_splits=None, block_m=None, block_n=None, seed=0, device="cpu", kernel="triton",
                     config=None, poison_rows=False) -> dict:
    """kernel "triton": mla_attention.mla_decode_triton (block_m / block_n); "triton_decode":
    mla_decode.mla_decode_headblock_triton (config: MLADecodeConfig fields). poison_rows: NaN in
    every cache row outside the contexts (the dense twin, which reads them, is then skipped)."""
    from server.kernels import workspace
    from server.kernels.mla_attention import mla_decode_triton
    from server.kernels.mla_decode import mla_decode_headblock_triton
    from server.kernels.mla_decode_config import MLADecodeConfig
    from server.kernels.mla_reference import mla_decode_dense, mla_decode_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    workspace.set_poison(True)
    q, cache, bt, _, ctx = make_latent_inputs([1] * len(ctx_lens), list(ctx_lens), heads, v_dim, rope_dim,
                                              block_size, dt, dev, seed)
    poisoned = poison_unused_rows(cache, bt, ctx) if poison_rows else 0
    scale = (v_dim + rope_dim) ** -0.5
    out = torch.full((q.shape[0], heads, v_dim), float("nan"), dtype=dt, device=dev)
    if kernel == "triton":
        mla_decode_triton(q, cache, bt, ctx, v_dim, scale, num_splits=num_splits, block_m=block_m, block_n=block_n,
                          out=out)
    elif kernel == "triton_decode":
        cfg = MLADecodeConfig(**config) if config is not None else None
        mla_decode_headblock_triton(q, cache, bt, ctx, v_dim, scale, config=cfg, num_splits=num_splits, out=out)
    else:
        raise ValueError(f"unknown MLA decode kernel {kernel!r}")
    rd = ref_dtype_for(dev)
    ref = mla_decode_reference(q.to(rd), cache.to(rd), bt, ctx, v_dim, scale)
    extra = {"num_splits": num_splits, "kernel": kernel, "poisoned_rows": poisoned}
    if not poison_rows:
        extra["dense_rel_err"] = rel_err(mla_decode_dense(q.to(rd), cache.to(rd), bt, ctx, v_dim, scale), ref)
    workspace.set_poison(False)
    return _result("mla_decode", rel_err(out, ref), dt, **extra)


def check_mla_prefill(q_lens=(5, 1, 19, 0), prefix_lens=(0, 9, 13, 4), heads=4, v_dim=32, rope_dim=16, block_size=8,
                      dtype="float32", block_m=None, block_n=None, seed=0, device="cpu") -> dict:
    from server.kernels import workspace
    from server.kernels.mla_attention import mla_prefill_triton
    from server.kernels.mla_reference import mla_attention_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    workspace.set_poison(True)
    ctx_lens = [a + b for a, b in zip(q_lens, prefix_lens)]
    q, cache, bt, cu, ctx = make_latent_inputs(list(q_lens), ctx_lens, heads, v_dim, rope_dim, block_size, dt, dev, seed)
    scale = (v_dim + rope_dim) ** -0.5
    out = torch.full((q.shape[0], heads, v_dim), float("nan"), dtype=dt, device=dev)
    mla_prefill_triton(q, cache, bt, cu, ctx, v_dim, scale, max_query_len=max(q_lens), block_m=block_m,
                       block_n=block_n, out=out)
    rd = ref_dtype_for(dev)
    ref = mla_attention_reference(q.to(rd), cache.to(rd), bt, cu, ctx, v_dim, scale)
    workspace.set_poison(False)
    return _result("mla_prefill", rel_err(out, ref), dt, tokens=int(cu[-1]))


def check_mla_write(num_tokens=6, dk=48, block_size=4, num_blocks=5, dtype="bfloat16", seed=0, device="cpu") -> dict:
    from server.kernels.mla_attention import write_latent_cache_triton
    from server.kernels.mla_reference import write_latent_cache

    dt, dev = DTYPES[dtype], torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int64)
    slots[1] = -1  # a padding token: nothing written (not the last slot either)
    latent = torch.randn(num_tokens, dk, generator=gen).to(dt)
    base = torch.randn(num_blocks, block_size, dk, generator=gen).to(dt)
    cache, ref = base.clone().to(dev), base.clone()
    write_latent_cache_triton(latent.to(dev), cache, slots.to(dev))
    write_latent_cache(latent, ref, slots)
    return {"check": "mla_write", "ok": bool(torch.equal(cache.cpu(), ref))}


MLA_CHECKS = {"mla_decode": check_mla_decode, "mla_prefill": check_mla_prefill, "mla_write": check_mla_write}
