"""One-pass RMSNorm and RoPE kernels == their torch twins (interpreter on CPU; GPU when present)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.support.interpret import run_source_in_interpreter

CHECK = r"""
import torch
from server.kernels.norm_rope import rms_norm_reference, rms_norm_triton, rope_reference, rope_triton
g = torch.Generator().manual_seed(0)
for rows, d, dt in [(1, 32, torch.float32), (37, 128, torch.float32), (5, 60, torch.float32), (19, 256, torch.bfloat16)]:
    x = torch.randn(rows, d, generator=g).to(dt) * 3
    w = (torch.rand(d, generator=g) + 0.5).to(dt)
    got, want = rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    tol = 1e-6 if dt == torch.float32 else 1e-2
    assert got.dtype == want.dtype and ((got.float() - want.float()).norm() / want.float().norm()) < tol, (rows, d, dt)
x = torch.randn(3, 4, 2, 16, generator=g)  # leading dims flatten to rows
assert torch.allclose(rms_norm_triton(x, torch.ones(16), 1e-5), rms_norm_reference(x, torch.ones(16), 1e-5), atol=1e-6)
assert rms_norm_triton(torch.zeros(0, 8), torch.ones(8), 1e-6).shape == (0, 8)
for t, h, d, dt in [(1, 1, 8, torch.float32), (9, 4, 32, torch.float32), (6, 20, 16, torch.float32), (7, 3, 24, torch.float32), (5, 4, 32, torch.bfloat16)]:
    x = torch.randn(t, h, d, generator=g).to(dt)
    ang = torch.rand(t, d // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    got, want = rope_triton(x, cos, sin), rope_reference(x, cos, sin)
    tol = 1e-6 if dt == torch.float32 else 1e-2
    assert ((got.float() - want.float()).norm() / want.float().norm()) < tol, (t, h, d, dt)
print("ok")
"""


def test_norm_rope_kernels_match_torch_in_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_source_in_interpreter(CHECK).strip() == "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_norm_rope_kernels_match_torch_on_gpu() -> None:
    from server.kernels.norm_rope import rms_norm_reference, rms_norm_triton, rope_reference, rope_triton

    for shape in [(8192, 2048), (8192 * 32, 128), (128, 2048), (3, 512)]:
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device="cuda").to(dt)
            w = (torch.rand(shape[-1], device="cuda") + 0.5).to(dt)
            got, want = rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
            assert ((got.float() - want.float()).norm() / want.float().norm()) < (1e-6 if dt == torch.float32 else 1e-2)
    for t, h in [(8192, 32), (8192, 4), (128, 32)]:
        x = torch.randn(t, h, 128, device="cuda", dtype=torch.bfloat16)
        ang = torch.rand(t, 64, device="cuda") * 100
        cos, sin = torch.cat([ang.cos()] * 2, -1).bfloat16(), torch.cat([ang.sin()] * 2, -1).bfloat16()
        got, want = rope_triton(x, cos, sin), rope_reference(x, cos, sin)
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
