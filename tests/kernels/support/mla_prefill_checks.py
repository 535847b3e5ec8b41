"""Expanded MLA prefill kernel (server/kernels/mla_prefill_expanded.py) vs its float32+ torch
twin, in the style of mla_checks.py. Inputs are laid out as the model passes them: k_nope and v
are strided views of one [Lk, H, DN + DV] decompression output, the RoPE key is one [Lk, 1, DR]
row shared by the heads (or per head), and every element no context covers is NaN: rows past
the last key, the pad lanes of the query buffers; the output starts as NaN, so a row the kernel
does not write, or a key it reads past its sequence, fails the check."""
from __future__ import annotations

import torch

from tests.kernels.support.checks import DTYPES, _result, ref_dtype_for, rel_err


def make_expanded_inputs(q_lens, prefix_lens, heads, dn, dr, dv, dtype, device, seed=0, shared_rope=True,
                         spare_rows=5):
    """(q_nope [T, H, DN], q_rope [T, H, DR], k_nope [Lk, H, DN], k_rope [Lk, 1|H, DR], v [Lk, H, DV],
    cu_q [S+1], cu_k [S+1]), views of NaN-padded buffers; scaled so scores stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    ctx = [q + p for q, p in zip(q_lens, prefix_lens)]
    t, lk = sum(q_lens), sum(ctx)
    qbuf = torch.full((t, heads, dn + dr + 3), float("nan"))
    qbuf[..., :dn + dr] = torch.randn(t, heads, dn + dr, generator=gen) * (dn + dr) ** -0.25
    kv = torch.full((lk + spare_rows, heads, dn + dv), float("nan"))  # as kv_b_proj's output, plus spare rows
    kv[:lk] = torch.randn(lk, heads, dn + dv, generator=gen)
    kr = torch.full((lk + spare_rows, 1 if shared_rope else heads, dr), float("nan"))
    kr[:lk] = torch.randn(lk, kr.shape[1], dr, generator=gen)
    qbuf, kv, kr = (x.to(dtype).to(device) for x in (qbuf, kv, kr))
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(ctx).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return (qbuf[..., :dn], qbuf[..., dn:dn + dr], kv[:lk, :, :dn], kr[:lk], kv[:lk, :, dn:], cu_q, cu_k)


def check_mla_prefill_expanded(q_lens=(5, 1, 19, 0), prefix_lens=(0, 9, 13, 4), heads=3, dn=16, dr=8, dv=16,
                               dtype="float32", config=None, shared_rope=True, seed=0, device="cpu") -> dict:
    """config: MLAPrefillConfig fields (None: the default for the dtype)."""
    from server.kernels.mla_prefill_config import MLAPrefillConfig
    from server.kernels.mla_prefill_expanded import mla_prefill_expanded_triton
    from server.kernels.mla_reference import mla_prefill_expanded_reference

    dt, dev = DTYPES[dtype], torch.device(device)
    q_n, q_r, k_n, k_r, v, cu_q, cu_k = make_expanded_inputs(q_lens, prefix_lens, heads, dn, dr, dv, dt, dev, seed,
                                                             shared_rope)
    scale = (dn + dr) ** -0.5
    out = torch.full((q_n.shape[0], heads, dv), float("nan"), dtype=dt, device=dev)
    cfg = MLAPrefillConfig(**config) if config is not None else None
    mla_prefill_expanded_triton(q_n, q_r, k_n, k_r, v, cu_q, cu_k, scale, max_query_len=max(q_lens), config=cfg,
                                out=out)
    rd = ref_dtype_for(dev)
    ref = mla_prefill_expanded_reference(*(x.to(rd) for x in (q_n, q_r, k_n, k_r, v)), cu_q, cu_k, scale)
    return _result("mla_prefill_expanded", rel_err(out, ref), dt, tokens=int(cu_q[-1]), keys=int(cu_k[-1]))
