"""The head-block MLA decode kernel (server/kernels/mla_decode.py) at DeepSeek-V3 / Kimi-K2 widths
(kv_lora_rank 512 + rope 64; 128, 64 or 16 heads) on a CUDA GPU; skipped without one. The
interpreter twin with tiny widths is test_kernels_mla_decode_interpreter.py; timings and the
roofline are scripts/bench_mla_decode.py."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.support.mla_checks import check_mla_decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
LATENT, ROPE = 512, 64


@pytest.mark.parametrize("heads", [128, 64, 16])
@pytest.mark.parametrize("ctx_lens,splits", [((1, 300, 77, 1024), None), ((5000,), None), ((513, 9), 8),
                                             ((40000, 3), None), (tuple(range(60, 188)), None)])
def test_real_widths(heads, ctx_lens, splits) -> None:
    r = check_mla_decode(ctx_lens=ctx_lens, heads=heads, v_dim=LATENT, rope_dim=ROPE, block_size=16, dtype="bfloat16",
                         num_splits=splits, kernel="triton_decode", poison_rows=True, device="cuda")
    assert r["ok"], r


@pytest.mark.parametrize("config", [
    {"BLOCK_H": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    {"BLOCK_H": 64, "BLOCK_N": 16, "num_warps": 8, "num_stages": 4},
    {"BLOCK_H": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_H": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
    {"BLOCK_H": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "num_splits": 5, "min_split_tokens": 64},
])
@pytest.mark.parametrize("page", [16, 64])
def test_configs_and_pages(config, page) -> None:
    """Tile shapes the bench sweeps compute the same thing, with tiles inside a page and across pages."""
    r = check_mla_decode(ctx_lens=(1, 130, 700, 64), heads=128, v_dim=LATENT, rope_dim=ROPE, block_size=page,
                         dtype="bfloat16", kernel="triton_decode", config=config, poison_rows=True, device="cuda")
    assert r["ok"], r


def test_fp32_and_fp16() -> None:
    for dtype in ("float32", "float16"):
        r = check_mla_decode(ctx_lens=(3, 100, 2000), heads=16, v_dim=LATENT, rope_dim=ROPE, dtype=dtype,
                             kernel="triton_decode", poison_rows=True, device="cuda")
        assert r["ok"], r


def test_inside_cuda_graph_with_new_lengths() -> None:
    """Captured once, replayed with other queries and longer contexts (the split bounds and the
    merge's split count are read on the device), at a batch that splits and one that does not."""
    from server.kernels.mla_decode import mla_decode_headblock_triton
    from server.kernels.mla_reference import mla_decode_reference
    from tests.kernels.support.mla_checks import make_latent_inputs

    scale = (LATENT + ROPE) ** -0.5
    for lens, new_lens in (([40, 700, 1, 300], [41, 701, 2, 301]), ([100] * 160, list(range(101, 261)))):
        q, cache, bt, _, ctx = make_latent_inputs([1] * len(lens), [x + 8 for x in new_lens], 128, LATENT, ROPE, 16,
                                                  torch.bfloat16, "cuda")
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        mla_decode_headblock_triton(q, cache, bt, ctx, LATENT, scale)  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = mla_decode_headblock_triton(q, cache, bt, ctx, LATENT, scale)
        q.copy_(torch.randn_like(q) * (LATENT + ROPE) ** -0.25)
        ctx.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        ref = mla_decode_reference(q.float(), cache.float(), bt, ctx, LATENT, scale)
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
