"""Every kernel launch the host wrappers make compiles for Hopper (sm_90) without spills.

No GPU needed: compile_check records the launches on meta tensors and runs triton.compile for
GPUTarget("cuda", 90); the bundled cuobjdump reads registers, spills and SASS.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.support import compile_check  # noqa: E402

SMEM = compile_check.SMEM_LIMIT


def compile_all(launches):
    out = {}
    for launch in launches:
        c = compile_check.compile_launch(launch)
        out[(c.name, c.key)] = c
    return list(out.values())


def test_decode_size_moe_pipeline_compiles() -> None:
    from server.moe.kernels.fused_moe import fused_moe_triton

    with compile_check.record_launches() as launches:
        fused_moe_triton(*compile_check.meta_moe(128))
    kernels = compile_all(launches)
    names = {c.name for c in kernels}
    assert {"_count_chunks_kernel", "_scatter_slots_kernel", "_gate_up_silu_kernel", "_down_scatter_kernel",
            "_combine_slots_kernel"} <= names
    for c in kernels:
        assert c.spill_bytes == 0 and c.shared <= SMEM, c


def test_prefill_size_gemms_use_wgmma() -> None:
    from server.moe.kernels.fused_moe import fused_moe_triton

    with compile_check.record_launches() as launches:
        fused_moe_triton(*compile_check.meta_moe(8192))
    gemms = [launch for launch in launches if "gate_up" in launch.kernel.fn.__name__ or "down" in launch.kernel.fn.__name__]
    for c in compile_all(gemms):
        assert c.spill_bytes == 0 and c.shared <= SMEM, c
        assert c.hgmma, f"{c.name} {c.key} is not on the wgmma path"


def test_attention_kernels_compile() -> None:
    from server.kernels.attention_decode import paged_decode_attention_triton, write_kv_cache_triton
    from server.kernels.attention_prefill import prefill_attention_triton

    m = dict(device="meta", dtype=torch.bfloat16)
    i32 = dict(device="meta", dtype=torch.int32)
    kc = torch.empty(512, 16, 4, 128, **m)
    with compile_check.record_launches() as launches:
        paged_decode_attention_triton(torch.empty(2, 32, 128, **m), kc, kc, torch.empty(2, 256, **i32),
                                      torch.empty(2, **i32), num_splits=8)
        prefill_attention_triton(torch.empty(256, 32, 128, **m), kc, kc, torch.empty(4, 8, **i32),
                                 torch.empty(5, **i32), torch.empty(4, **i32), max_query_len=64)
        write_kv_cache_triton(torch.empty(8, 4, 128, **m), torch.empty(8, 4, 128, **m), kc, kc,
                              torch.empty(8, device="meta", dtype=torch.int64))
    kernels = compile_all(launches)
    assert {c.name for c in kernels} == {"_decode_split_kernel", "_decode_merge_kernel", "_prefill_kernel",
                                         "_write_kv_kernel"}
    for c in kernels:
        assert c.spill_bytes == 0 and c.shared <= SMEM, c


def test_mla_decode_kernel_compiles_to_wgmma_without_spills() -> None:
    """DeepSeek-V3 widths (512 + 64, bf16), the default configs: with 128 heads, 64 heads a program
    is what puts both products on wgmma, and its [64, 512] fp32 accumulator must fit in registers
    (split launch + merge); with 16 heads, 16-head blocks must fit too (one split, direct store)."""
    from server.kernels.mla_decode import mla_decode_headblock_triton

    m = dict(device="meta", dtype=torch.bfloat16)
    i32 = dict(device="meta", dtype=torch.int32)
    cache = torch.empty(4096, 16, 576, **m)
    with compile_check.record_launches() as launches:
        for seqs, heads, splits in ((2, 128, 16), (128, 16, 1)):
            mla_decode_headblock_triton(torch.empty(seqs, heads, 576, **m), cache, torch.empty(seqs, 256, **i32),
                                        torch.empty(seqs, **i32), 512, 0.07, num_splits=splits)
    kernels = compile_all(launches)
    assert sorted(c.name for c in kernels) == ["_merge_kernel", "_mla_decode_kernel", "_mla_decode_kernel"]
    for c in kernels:
        assert c.spill_bytes == 0 and c.shared <= SMEM, c
        if c.name == "_mla_decode_kernel" and "BLOCK_H=64" in c.key:
            assert c.hgmma and not c.hmma, f"{c.key} is not on the wgmma path"
    assert sum("BLOCK_H=64" in c.key for c in kernels) == 1


def test_expanded_mla_prefill_tiles_compile_to_wgmma_without_spills() -> None:
    """The expanded MLA prefill kernel at DeepSeek-V3 widths (nope 128 + rope 64 scores, v 128,
    128 heads, the RoPE key shared with head stride 0), with its 16-bit default tiles and every
    tile shape scripts/bench_mla_prefill.py sweeps: both dots on wgmma, no spills, shared memory
    within the limit."""
    import importlib.util
    from pathlib import Path

    from server.kernels.mla_prefill_config import MLAPrefillConfig, default_config
    from server.kernels.mla_prefill_expanded import mla_prefill_expanded_triton

    spec = importlib.util.spec_from_file_location("bench_mla_prefill",
                                                  Path(__file__).resolve().parents[2] / "scripts/bench_mla_prefill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # defines the sweep's TILES; main() does not run
    tiles = bench.TILES
    m = dict(device="meta", dtype=torch.bfloat16)
    i32 = dict(device="meta", dtype=torch.int32)
    tokens, heads = 4096, 128
    kv, latent = torch.empty(tokens, heads, 256, **m), torch.empty(tokens, 576, **m)  # kv_b_proj output, rows
    q = torch.empty(tokens, heads, 192, **m)
    configs = [default_config(torch.bfloat16)] + [MLAPrefillConfig(*t) for t in tiles]
    with compile_check.record_launches() as launches:
        for cfg in configs:
            mla_prefill_expanded_triton(q[..., :128], q[..., 128:], kv[..., :128], latent[:, None, 512:], kv[..., 128:],
                                        torch.empty(2, **i32), torch.empty(2, **i32), 0.1, max_query_len=tokens,
                                        config=cfg)
    assert len(launches) == len(configs)
    for c in compile_all(launches):
        assert c.spill_bytes == 0 and c.shared <= SMEM and c.hgmma, c
