"""Triton kernels vs torch at real (Qwen3-30B-A3B) shapes on a CUDA GPU; skipped without one.

MoE: H=2048, E=128, top-8, I=768 (EP4: 32 local experts). Attention: 32 q / 4 kv heads,
head_dim 128, page 16. Every check draws fresh random inputs, poisons the kernels' buffers and
compares with the torch twin in float32 (tests/kernels/support/checks.py); the token buckets,
EP row counts and decode / prefill batches below are the ones the server runs.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.support import checks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

H, E, K, I = 2048, 128, 8, 768


@pytest.fixture(scope="module")
def qwen3_weights():
    return checks.make_moe_weights(E, H, I, torch.bfloat16, "cuda", seed=0)


@pytest.mark.parametrize("tokens", [1, 8, 64, 128, 512, 2048, 8192])
def test_fused_moe_real_shape(qwen3_weights, tokens: int) -> None:
    r = checks.check_fused_moe(num_tokens=tokens, top_k=K, num_experts=E, hidden=H, inter=I, dtype="bfloat16",
                               skip_frac=0.0, block_m=None, seed=tokens, device="cuda", weights=qwen3_weights)
    assert r["ok"], r


def test_fused_moe_ep_slots_skipped(qwen3_weights) -> None:
    r = checks.check_fused_moe(num_tokens=300, top_k=K, num_experts=E, hidden=H, inter=I, dtype="bfloat16",
                               skip_frac=0.6, block_m=None, seed=5, device="cuda", weights=qwen3_weights)
    assert r["ok"], r


@pytest.mark.parametrize("chunk_tokens", [4, 3000])  # one align chunk; several
def test_align_on_gpu(chunk_tokens: int) -> None:
    r = checks.check_align(num_tokens=chunk_tokens, top_k=K, num_experts=E, block_m=64, chunk=1024, device="cuda")
    assert r["ok"], r


def test_grouped_mlp_real_shape(qwen3_weights) -> None:
    w13, w2 = qwen3_weights
    counts = torch.randint(0, 90, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    r = checks.check_grouped_mlp(counts=tuple(counts), hidden=H, inter=I, dtype="bfloat16", block_m=None,
                                 device="cuda", weights=(w13[:32], w2[:32]))
    assert r["ok"], r


def test_expert_rows_real_shape() -> None:
    r = checks.check_expert_rows(num_rows=3000, num_experts=32, hidden=H, inter=I, dtype="bfloat16", block_m=None,
                                 device="cuda")
    assert r["ok"], r


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_moe_small_dtypes(dtype: str) -> None:
    r = checks.check_fused_moe(num_tokens=33, top_k=4, num_experts=16, hidden=256, inter=128, dtype=dtype,
                               block_m=None, device="cuda")
    assert r["ok"], r


@pytest.mark.parametrize("ctx_lens,splits", [((1, 300, 77, 1024), None), ((5000,), None), ((513, 9), 8)])
def test_decode_attention_real_heads(ctx_lens, splits) -> None:
    r = checks.check_decode(ctx_lens=ctx_lens, q_heads=32, kv_heads=4, head_dim=128, block_size=16,
                            dtype="bfloat16", num_splits=splits, block_n=64, device="cuda")
    assert r["ok"], r


@pytest.mark.parametrize("q_lens,prefix", [((64,) * 8, (0,) * 8), ((300, 1, 17), (0, 500, 64))])
def test_prefill_attention_real_heads(q_lens, prefix) -> None:
    r = checks.check_prefill(q_lens=q_lens, prefix_lens=prefix, q_heads=32, kv_heads=4, head_dim=128, block_size=16,
                             dtype="bfloat16", block_m=64, block_n=64, device="cuda")
    assert r["ok"], r


def test_write_kv_on_gpu() -> None:
    assert checks.check_write_kv(num_tokens=50, kv_heads=4, head_dim=128, block_size=16, num_blocks=10,
                                 device="cuda")["ok"]


def test_fused_moe_inside_cuda_graph(qwen3_weights) -> None:
    from server.moe.kernels.fused_moe import fused_moe_triton

    w13, w2 = qwen3_weights
    x, ids, w = checks.make_moe_routing(64, H, E, K, torch.bfloat16, "cuda", seed=1)
    fused_moe_triton(x, w13, w2, ids, w)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_moe_triton(x, w13, w2, ids, w)
    x2, ids2, w_2 = checks.make_moe_routing(64, H, E, K, torch.bfloat16, "cuda", seed=2)
    x.copy_(x2)
    ids.copy_(ids2)
    w.copy_(w_2)
    g.replay()
    assert torch.equal(out, fused_moe_triton(x, w13, w2, ids, w))


@pytest.mark.parametrize("tokens", [128, 8192])
def test_ep4_rows_real_shape(qwen3_weights, tokens: int) -> None:
    """One EP4 rank's share of a step (tokens * top-8 / 4 rows, 32 local experts): grouped rows
    (dispatch order sorted by expert) and the same count of rows in any order."""
    w13, w2 = qwen3_weights
    rows = tokens * K // 4
    counts = torch.multinomial(torch.ones(32), rows, replacement=True,
                               generator=torch.Generator().manual_seed(tokens)).bincount(minlength=32)
    r = checks.check_grouped_mlp(counts=tuple(counts.tolist()), hidden=H, inter=I, dtype="bfloat16", block_m=None,
                                 device="cuda", weights=(w13[:32], w2[:32]))
    assert r["ok"], r
    r = checks.check_expert_rows(num_rows=rows, num_experts=32, hidden=H, inter=I, dtype="bfloat16", block_m=None,
                                 seed=tokens, device="cuda")
    assert r["ok"], r


@pytest.mark.parametrize("num_seqs,max_context", [(128, 320), (128, 2048), (8, 16384)])
def test_decode_attention_serving_batches(num_seqs: int, max_context: int) -> None:
    """Decode batches with context lengths drawn from [max/2, max]; kernel defaults (split count,
    tile) as the server runs them."""
    gen = torch.Generator().manual_seed(num_seqs + max_context)
    lens = torch.randint(max_context // 2, max_context + 1, (num_seqs,), generator=gen).tolist()
    r = checks.check_decode(ctx_lens=tuple(lens), q_heads=32, kv_heads=4, head_dim=128, block_size=16,
                            dtype="bfloat16", num_splits=None, block_n=None, seed=num_seqs, device="cuda")
    assert r["ok"], r


@pytest.mark.parametrize("num_seqs,q_len,prefix", [(128, 64, 0), (4, 2048, 0), (16, 256, 768)])
def test_prefill_attention_serving_batches(num_seqs: int, q_len: int, prefix: int) -> None:
    """Prompt batches (many short, few long) and a chunked prefill over a cached prefix."""
    r = checks.check_prefill(q_lens=(q_len,) * num_seqs, prefix_lens=(prefix,) * num_seqs, q_heads=32, kv_heads=4,
                             head_dim=128, block_size=16, dtype="bfloat16", block_m=None, block_n=None,
                             seed=num_seqs + q_len, device="cuda")
    assert r["ok"], r


def test_decode_attention_inside_cuda_graph() -> None:
    """Captured once, replayed on new queries and context lengths: the same output as eager."""
    from server.kernels.attention_decode import paged_decode_attention_triton

    q, kc, vc, bt, _, ctx = checks.make_paged_inputs([1] * 128, [300] * 128, 32, 4, 128, 16, torch.bfloat16, "cuda",
                                                     seed=2)
    paged_decode_attention_triton(q, kc, vc, bt, ctx)  # compile before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = paged_decode_attention_triton(q, kc, vc, bt, ctx)
    q.copy_(torch.randn_like(q))
    ctx.copy_(torch.randint(1, 300, ctx.shape, device="cuda", dtype=ctx.dtype))
    g.replay()
    assert torch.equal(out, paged_decode_attention_triton(q, kc, vc, bt, ctx))
