"""The MLA latent-cache kernels vs their torch twins at DeepSeek-V3 / Kimi-K2 widths (kv_lora_rank
512 + rope 64; 128 or 64 heads) on a CUDA GPU; skipped without one. Timings and the HBM-roofline
figure are scripts/bench_mla_decode.py; these are the pass/fail half."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.support.mla_checks import check_mla_decode, check_mla_prefill, check_mla_write

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
LATENT, ROPE = 512, 64


@pytest.mark.parametrize("heads", [128, 64, 16])
@pytest.mark.parametrize("ctx_lens,splits", [((1, 300, 77, 1024), None), ((5000,), None), ((513, 9), 8),
                                             (tuple(range(60, 188)), None)])  # 128 sequences, bench-like
def test_mla_decode_real_widths(heads, ctx_lens, splits) -> None:
    r = check_mla_decode(ctx_lens=ctx_lens, heads=heads, v_dim=LATENT, rope_dim=ROPE, block_size=16, dtype="bfloat16",
                         num_splits=splits, device="cuda")
    assert r["ok"], r
    assert r["dense_rel_err"] < 1e-2, r  # the batched-matmul alternative agrees as well


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 32), (64, 32), (32, 64)])
def test_mla_decode_block_shapes(block_m, block_n) -> None:
    """Every tile shape bench_mla_decode.py sweeps computes the same thing."""
    r = check_mla_decode(ctx_lens=(1, 130, 700), heads=128, v_dim=LATENT, rope_dim=ROPE, block_size=64,
                         dtype="bfloat16", block_m=block_m, block_n=block_n, device="cuda")
    assert r["ok"], r


@pytest.mark.parametrize("q_lens,prefix", [((64,) * 8, (0,) * 8), ((300, 1, 17), (0, 500, 64))])
def test_mla_prefill_real_widths(q_lens, prefix) -> None:
    r = check_mla_prefill(q_lens=q_lens, prefix_lens=prefix, heads=128, v_dim=LATENT, rope_dim=ROPE, block_size=16,
                          dtype="bfloat16", device="cuda")
    assert r["ok"], r


def test_mla_fp32() -> None:
    assert check_mla_decode(ctx_lens=(3, 100), heads=16, v_dim=LATENT, rope_dim=ROPE, dtype="float32",
                            device="cuda")["ok"]
    assert check_mla_prefill(q_lens=(9, 1), prefix_lens=(0, 40), heads=16, v_dim=LATENT, rope_dim=ROPE,
                             dtype="float32", device="cuda")["ok"]


def test_mla_write_on_gpu() -> None:
    assert check_mla_write(num_tokens=50, dk=LATENT + ROPE, block_size=16, num_blocks=10, device="cuda")["ok"]


def test_mla_decode_inside_cuda_graph() -> None:
    """Captured once, replayed with other queries and longer contexts: the kernel's grid depends on
    static shapes only, and the split bounds are read on the device."""
    from server.kernels.mla_attention import mla_decode_triton
    from tests.kernels.support.mla_checks import make_latent_inputs
    from server.kernels.mla_reference import mla_decode_reference

    q, cache, bt, _, ctx = make_latent_inputs([1] * 4, [40, 700, 1, 300], 128, LATENT, ROPE, 16, torch.bfloat16, "cuda")
    scale = (LATENT + ROPE) ** -0.5
    mla_decode_triton(q, cache, bt, ctx, LATENT, scale)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode_triton(q, cache, bt, ctx, LATENT, scale)
    q.copy_(torch.randn_like(q))
    ctx.copy_(torch.tensor([41, 701, 2, 301], dtype=torch.int32, device="cuda"))
    graph.replay()
    ref = mla_decode_reference(q.float(), cache.float(), bt, ctx, LATENT, scale)
    assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
