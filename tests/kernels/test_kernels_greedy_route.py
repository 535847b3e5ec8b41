"""Triton greedy_balanced kernel == torch path (interpreter on CPU; real GPU when present)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.support.interpret import run_source_in_interpreter

INTERPRETER_CHECK = r"""
import torch
from server.moe.kernels.greedy_route import greedy_balanced_triton
from server.moe.routing.greedy import greedy_balanced_torch
cases = [(0, 8, 2, 1), (1, 8, 2, 1), (37, 8, 2, 1), (50, 60, 8, 2), (41, 64, 6, 1), (70, 12, 5, 2), (33, 7, 3, 1), (130, 16, 1, 4)]
for n, e, k, rb in cases:
    g = torch.Generator().manual_seed(n * 31 + e)
    s = torch.randn(n, e, generator=g) * 3
    if n % 2:
        s = torch.round(s)  # many equal scores: ties must break to the lower expert id
    got = greedy_balanced_triton(s, k, rounds_per_program=rb)
    want = greedy_balanced_torch(s, k)
    assert torch.equal(got, want), (n, e, k)
    bf = greedy_balanced_triton(s.to(torch.bfloat16), k)
    assert torch.equal(bf, greedy_balanced_torch(s.to(torch.bfloat16), k)), (n, e, k, "bf16")
print("ok", len(cases))
"""


def test_triton_kernel_matches_torch_in_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_source_in_interpreter(INTERPRETER_CHECK).strip() == "ok 8"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_matches_torch_on_gpu() -> None:
    from server.moe.kernels.greedy_route import greedy_balanced_triton
    from server.moe.routing.greedy import greedy_balanced_torch

    for n, e, k in [(1, 256, 8), (128, 256, 8), (8192, 256, 8), (4096, 60, 8), (3000, 128, 6), (777, 64, 1)]:
        s = torch.randn(n, e, device="cuda")
        assert torch.equal(greedy_balanced_triton(s, k).cpu(), greedy_balanced_torch(s.cpu(), k))


def _score_cases(n: int, e: int, seed: int) -> dict[str, torch.Tensor]:
    """Router-score shapes that drive every path of the CUDA kernel: narrow spreads (ranked
    lists cover the round), wide spreads and per-expert bias (lists run out: exact fallback),
    heavy ties (tie fix-up), all-equal scores."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, e, generator=g)
    return {
        "randn": base,
        "wide": base * 100,
        "biased": base + torch.linspace(-3, 3, e),
        "ties": torch.round(base * 2) / 2,
        "equal": torch.zeros(n, e),
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_torch_on_gpu() -> None:
    from server.moe.kernels.greedy_route_cuda import greedy_balanced_cuda
    from server.moe.routing.greedy import greedy_balanced_ids, greedy_balanced_torch

    shapes = [(1, 256, 8), (31, 256, 8), (8192, 256, 8), (1000, 128, 8), (4095, 128, 4), (777, 60, 4),
              (500, 64, 8), (333, 8, 2), (64, 16, 2), (300, 256, 32), (50, 64, 64)]
    for n, e, k in shapes:
        for name, scores in _score_cases(n, e, n * 7 + e).items():
            for dtype in (torch.bfloat16, torch.float16):
                s = scores.to(dtype)
                got = greedy_balanced_cuda(s.cuda(), k)
                assert got is not None, "the CUDA kernel must apply to bf16/fp16 scores with E % k == 0 on a GPU"
                want = greedy_balanced_torch(s, k)
                assert torch.equal(got.cpu(), want), (n, e, k, name, dtype)
    # strided rows (a column slice), the policy dispatch, and CUDA-graph capture
    wide = torch.randn(2048, 300, device="cuda").to(torch.bfloat16)[:, :256]
    assert torch.equal(greedy_balanced_ids(wide, 8).cpu(), greedy_balanced_torch(wide.cpu(), 8))
    s = torch.randn(4096, 256, device="cuda").to(torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    greedy_balanced_ids(s, 8)
    with torch.cuda.graph(graph):
        captured = greedy_balanced_ids(s, 8)
    s.copy_(torch.randn(4096, 256, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.cpu(), greedy_balanced_torch(s.cpu(), 8))


def test_cuda_kernel_dispatch_rules() -> None:
    """Which calls the CUDA kernel takes (the rest go to Triton): bf16/fp16, E % k == 0, E <= 256,
    E/k <= 32, CUDA tensors only."""
    from server.moe.kernels.greedy_route_cuda import greedy_balanced_cuda, kernel_applies

    nvrtc = hasattr(torch.cuda, "_compile_kernel")
    assert kernel_applies(256, 8, torch.bfloat16) is nvrtc
    assert kernel_applies(60, 4, torch.float16) is nvrtc
    assert not kernel_applies(256, 8, torch.float32)  # fp32 codes do not fit 16 bits
    assert not kernel_applies(256, 6, torch.bfloat16)  # E % k != 0: super-rounds, Triton
    assert not kernel_applies(512, 16, torch.bfloat16)  # expert id must fit 8 bits
    assert not kernel_applies(256, 4, torch.bfloat16)  # 64 tokens per round
    assert greedy_balanced_cuda(torch.randn(4, 256).to(torch.bfloat16), 8) is None  # CPU tensor
