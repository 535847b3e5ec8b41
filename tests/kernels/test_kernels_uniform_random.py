"""Triton uniform_random kernel == torch path (interpreter on CPU; real GPU when present)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.support.interpret import run_source_in_interpreter

INTERPRETER_CHECK = r"""
import torch
from server.moe.kernels.uniform_random_route import uniform_random_triton
from server.moe.routing.uniform_random import uniform_random_torch
cases = [(0, 8, 2, 0), (1, 8, 2, 5), (37, 60, 4, 3), (50, 256, 8, 1000), (33, 7, 3, 0), (20, 128, 1, 77)]
for n, e, k, off in cases:
    for key in (0, 0xDEADBEEF):
        for offset in (off, torch.tensor(off)):  # int, or a 0-d tensor read at run time
            got = uniform_random_triton(n, e, k, key, offset, torch.device("cpu"))
            assert torch.equal(got, uniform_random_torch(n, e, k, key, off, torch.device("cpu"))), (n, e, k, off, key)
print("ok", len(cases))
"""


def test_uniform_random_kernel_matches_torch_in_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_source_in_interpreter(INTERPRETER_CHECK).strip() == "ok 6"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uniform_random_kernel_matches_torch_on_gpu() -> None:
    from server.moe.routing import RoutingContext, build_policy
    from server.moe.routing.uniform_random import uniform_random_torch

    policy = build_policy("uniform_random", seed=3)
    for n, e, k in [(1, 256, 8), (8192, 256, 8), (4095, 128, 4), (777, 60, 4), (300, 16, 2)]:
        ids_in = torch.zeros(n, k, dtype=torch.int32, device="cuda")
        w_in = torch.full((n, k), 1.0 / k, device="cuda")
        ctx = RoutingContext(layer=2, num_experts=e, top_k=k, token_offset=11)
        got, _ = policy(ids_in, w_in, torch.zeros(n, e, device="cuda"), ctx)
        cpu, _ = policy(ids_in.cpu(), w_in.cpu(), torch.zeros(n, e), ctx)
        assert torch.equal(got.cpu(), cpu), (n, e, k)
    # a device-tensor token offset inside a CUDA graph reads its value at replay
    offset = torch.tensor(0, device="cuda")
    ctx = RoutingContext(layer=0, num_experts=256, top_k=8, token_offset=offset)
    ids_in, w_in, logits = torch.zeros(512, 8, dtype=torch.int32, device="cuda"), torch.ones(512, 8, device="cuda"), torch.zeros(512, 256, device="cuda")
    policy(ids_in, w_in, logits, ctx)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = policy(ids_in, w_in, logits, ctx)
    offset.fill_(4096)
    graph.replay()
    torch.cuda.synchronize()
    key_ctx = RoutingContext(layer=0, num_experts=256, top_k=8)
    from server.moe.routing.hashing import stream_key
    want = uniform_random_torch(512, 256, 8, stream_key(3, key_ctx.seed, 0), 4096, torch.device("cpu"))
    assert torch.equal(captured.cpu(), want)
