"""Block-FP8 MoE kernels vs their fp32 twin at Qwen3-30B-A3B shapes on a CUDA GPU; skipped without one.

H=2048, E=128, top-8, I=768 (EP: 32 local experts), bf16 activations, default configs (or a
stored *_fp8.json). Checks as in the interpreter tests (tests/kernels/support/fp8_checks.py):
poisoned buffers, a twin that quantises where the kernels do, tolerance of one bf16 rounding.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.support import fp8_checks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

H, E, K, I = 2048, 128, 8, 768


def test_quantize_matches_twin_on_gpu() -> None:
    r = fp8_checks.check_quantize(rows=4099, k=H, dtype="bfloat16", valid=3000, device="cuda")
    assert r["ok"], r


@pytest.mark.parametrize("tokens", [1, 64, 512, 2048, 8192])
def test_fused_moe_fp8_real_shape(tokens: int) -> None:
    r = fp8_checks.check_fused_moe_fp8(num_tokens=tokens, top_k=K, num_experts=E, hidden=H, inter=I,
                                       dtype="bfloat16", skip_frac=0.0, block_m=None, seed=tokens, device="cuda")
    assert r["ok"], r


def test_fused_moe_fp8_ep_slots_skipped() -> None:
    r = fp8_checks.check_fused_moe_fp8(num_tokens=300, top_k=K, num_experts=E, hidden=H, inter=I, dtype="bfloat16",
                                       skip_frac=0.6, block_m=None, seed=5, device="cuda")
    assert r["ok"], r


@pytest.mark.parametrize("rows", [7, 4096])
def test_ep_paths_fp8(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    counts = torch.multinomial(torch.ones(32), rows, replacement=True, generator=gen).bincount(minlength=32)
    r = fp8_checks.check_grouped_fp8(counts=counts.tolist(), hidden=H, inter=I, dtype="bfloat16", block_m=None,
                                     device="cuda")
    assert r["ok"], r
    r = fp8_checks.check_expert_rows_fp8(num_rows=rows, num_experts=32, hidden=H, inter=I, dtype="bfloat16",
                                         block_m=None, device="cuda")
    assert r["ok"], r


def test_fp8_pipeline_replays_in_a_cuda_graph() -> None:
    """Captured once, replayed on new routing of the same shape: matches an eager call."""
    from server.moe.kernels.fused_moe_fp8 import fused_moe_fp8_triton

    w = fp8_checks.fp8_weights(E, H, I, "cuda")
    x = torch.randn(64, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, E, (64, K), device="cuda", dtype=torch.int32)
    gate = torch.rand(64, K, device="cuda")
    out = torch.empty_like(x)
    fused_moe_fp8_triton(x, *w, ids, gate, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe_fp8_triton(x, *w, ids, gate, out=out)
    ids.copy_(torch.randint(0, E, (64, K), device="cuda", dtype=torch.int32))
    graph.replay()
    torch.testing.assert_close(out, fused_moe_fp8_triton(x, *w, ids, gate), rtol=0, atol=0)
