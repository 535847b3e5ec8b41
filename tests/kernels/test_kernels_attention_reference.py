"""Torch twins of the paged attention kernels against a dense per-head oracle."""
from __future__ import annotations

import math

import pytest
import torch

from server.kernels import ops
from server.kernels.attention_reference import (
    gather_kv,
    paged_decode_attention_reference,
    prefill_attention_reference,
    write_kv_cache,
)
from tests.kernels.support.checks import make_paged_inputs, rel_err


def dense_attention(q, k, v, q_pos):
    """q [n, Hq, D], k/v [L, Hkv, D]; query i sees keys 0..q_pos[i]; per head, float64 loops."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(q.shape[1]):
        for i in range(q.shape[0]):
            keys = k[: q_pos[i] + 1, h // group].double()
            w = torch.softmax(keys @ q[i, h].double() / math.sqrt(q.shape[2]), dim=0)
            out[i, h] = w @ v[: q_pos[i] + 1, h // group].double()
    return out


def test_prefill_reference_with_prefix_matches_dense() -> None:
    q_lens, prefix = [3, 1, 6, 0], [0, 5, 9, 2]
    ctx_lens = [a + b for a, b in zip(q_lens, prefix)]
    q, kc, vc, bt, cu, ctx = make_paged_inputs(q_lens, ctx_lens, 4, 2, 8, 4, torch.float64, "cpu", seed=1)
    got = prefill_attention_reference(q, kc, vc, bt, cu, ctx)
    for s, (ql, c) in enumerate(zip(q_lens, ctx_lens)):
        if ql == 0:
            continue
        k, v = gather_kv(kc, bt[s], c), gather_kv(vc, bt[s], c)
        want = dense_attention(q[cu[s] : cu[s + 1]], k, v, list(range(c - ql, c)))
        assert rel_err(got[cu[s] : cu[s + 1]], want) < 1e-12


def test_decode_is_prefill_with_one_token() -> None:
    ctx_lens = [1, 7, 20]
    q, kc, vc, bt, cu, ctx = make_paged_inputs([1, 1, 1], ctx_lens, 8, 2, 16, 4, torch.float32, "cpu", seed=2)
    dec = paged_decode_attention_reference(q, kc, vc, bt, ctx)
    pre = prefill_attention_reference(q, kc, vc, bt, cu, ctx)
    assert torch.allclose(dec, pre, atol=1e-6)
    k0 = gather_kv(kc, bt[0], 1)
    assert torch.allclose(dec[0], gather_kv(vc, bt[0], 1)[0].repeat_interleave(4, 0))  # one key: output = v
    assert k0.shape == (1, 2, 16)


def test_write_kv_cache_skips_negative_slots() -> None:
    kc = torch.randn(3, 4, 2, 8)
    vc = torch.randn(3, 4, 2, 8)
    before_k = kc.clone()
    k = torch.randn(3, 2, 8)
    v = torch.randn(3, 2, 8)
    slots = torch.tensor([5, -1, 11])
    write_kv_cache(k, v, kc, vc, slots)
    flat = kc.view(12, 2, 8)
    assert torch.equal(flat[5], k[0]) and torch.equal(flat[11], k[2])
    untouched = [i for i in range(12) if i not in (5, 11)]
    assert torch.equal(flat[untouched], before_k.view(12, 2, 8)[untouched])
    assert torch.equal(vc.view(12, 2, 8)[11], v[2])


def test_bad_inputs_are_named() -> None:
    q, kc, vc, bt, cu, ctx = make_paged_inputs([2, 1], [2, 3], 4, 2, 8, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        prefill_attention_reference(q[:, :3], kc, vc, bt, cu, ctx)
    with pytest.raises(ValueError, match="context_lens"):
        prefill_attention_reference(q, kc, vc, bt, cu, ctx[:1])
    with pytest.raises(ValueError, match="new tokens but context_lens"):
        prefill_attention_reference(q, kc, vc, bt, cu, torch.tensor([1, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="at least the new token"):
        paged_decode_attention_reference(q[:2], kc, vc, bt, torch.tensor([0, 3], dtype=torch.int32))


def test_front_door_dispatches_to_torch_on_cpu() -> None:
    q, kc, vc, bt, cu, ctx = make_paged_inputs([3, 2], [5, 2], 4, 2, 8, 4, torch.float32, "cpu", seed=3)
    got = ops.prefill_attention(q, kc, vc, bt, cu, ctx, max_query_len=3)
    assert torch.equal(got, prefill_attention_reference(q, kc, vc, bt, cu, ctx))
