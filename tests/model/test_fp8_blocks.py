"""Block-wise FP8 dequantisation arithmetic (server/kernels/fp8_blocks.py) against a block-by-block
loop: partial edge blocks, fused expert tensors, and the block size a scale grid implies."""
from __future__ import annotations

import pytest
import torch

from server.kernels.fp8_blocks import dequantize_blocks, implied_block, scale_shape
from tests.helpers.fp8_checkpoint import dequantize_reference


def _codes(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape) * 100).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("rows,cols,block", [(300, 200, (128, 128)), (128, 256, (128, 128)), (7, 5, (128, 128)),
                                             (576, 160, (128, 128)), (40, 24, (16, 8))])
def test_each_element_takes_its_own_blocks_scale(rows, cols, block):
    torch.manual_seed(rows)
    codes = _codes(rows, cols)
    scales = torch.rand(*scale_shape((rows, cols), block)) * 10 + 0.1  # distinct per block, so any misplacement shows
    got = dequantize_blocks(codes, scales, block)
    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    assert torch.equal(got, dequantize_reference(codes, scales, block))


def test_fused_expert_tensors_dequantise_expert_by_expert():
    torch.manual_seed(0)
    codes = _codes(3, 200, 136)  # [E, rows, cols]
    scales = torch.rand(3, 2, 2) + 0.5  # [E, ceil(200/128), ceil(136/128)]
    got = dequantize_blocks(codes, scales, (128, 128))
    for e in range(3):
        assert torch.equal(got[e], dequantize_reference(codes[e], scales[e]))


def test_bf16_scales_are_widened_before_the_product():
    codes = _codes(4, 4)
    scales = torch.tensor([[0.3]], dtype=torch.bfloat16)
    assert torch.equal(dequantize_blocks(codes, scales, (128, 128)), codes.float() * scales.float())


def test_scale_shape_and_implied_block():
    assert scale_shape((576, 7168), (128, 128)) == (5, 56)
    assert scale_shape((8, 300, 129), (128, 128)) == (8, 3, 2)
    assert implied_block((576, 7168), (5, 56)) == (116, 128)  # the smallest block giving that grid
    assert implied_block((32, 32), (2, 2)) == (16, 16)
    assert implied_block((32, 32), (1,)) is None  # wrong rank: no block explains it
    assert implied_block((4, 32, 32), (3, 1, 1)) is None  # leading (expert) dim differs
