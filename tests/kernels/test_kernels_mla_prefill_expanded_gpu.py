"""The expanded MLA prefill kernel (server/kernels/mla_prefill_expanded.py) at DeepSeek-V3 widths
(nope 128 + rope 64 scores, v 128) on a CUDA GPU, prompts up to 8192 tokens; skipped without one.
The interpreter twin with tiny widths is test_kernels_mla_prefill_expanded_interpreter.py;
timings against the absorbed kernel are scripts/bench_mla_prefill.py."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.support.mla_prefill_checks import check_mla_prefill_expanded

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
REAL = {"dn": 128, "dr": 64, "dv": 128}


@pytest.mark.parametrize("q_lens,prefix_lens,heads", [
    ((4096,), (0,), 16),  # one long prompt
    ((8192,), (0,), 4),
    ((1000, 4097, 1, 333), (0, 0, 0, 0), 16),  # ragged whole prompts beside a one-token row
    ((512, 2048), (3584, 100), 16),  # chunks over cached prefixes (L = 4096 and 2148)
    ((700, 300), (0, 77), 128),  # all 128 heads
])
def test_real_widths(q_lens, prefix_lens, heads) -> None:
    r = check_mla_prefill_expanded(q_lens=q_lens, prefix_lens=prefix_lens, heads=heads, dtype="bfloat16",
                                   device="cuda", **REAL)
    assert r["ok"], r


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
])
def test_tile_configs(config) -> None:
    """Tile shapes the bench sweeps compute the same thing (per-head RoPE keys too)."""
    for shared in (True, False):
        r = check_mla_prefill_expanded(q_lens=(1500, 129), prefix_lens=(0, 1000), heads=8, dtype="bfloat16",
                                       config=config, shared_rope=shared, device="cuda", **REAL)
        assert r["ok"], (shared, r)


def test_fp32_and_fp16() -> None:
    for dtype in ("float32", "float16"):
        r = check_mla_prefill_expanded(q_lens=(300, 45), prefix_lens=(0, 200), heads=4, dtype=dtype, device="cuda",
                                       **REAL)
        assert r["ok"], (dtype, r)
