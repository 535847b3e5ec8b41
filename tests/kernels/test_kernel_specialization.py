"""Kernels launched with a different row or token count every step compile once per variant.

Triton keys its compile cache on every int argument's value class (== 1, divisible by 16,
other) unless the kernel says do_not_specialize. The serving path calls the kernels with a
new count nearly every step (prefill and mixed steps are eager), so a specialised count
means a JIT compile in the middle of serving. Here the host wrappers run on meta tensors at
many counts (no GPU, nothing compiles: compile_check records the launches) and the launches'
cache keys are compared with the variants the wrappers select on purpose (tile constexprs).
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.support import compile_check  # noqa: E402

META = dict(device="meta", dtype=torch.bfloat16)
I32 = dict(device="meta", dtype=torch.int32)


def keys_by_kernel(call, counts) -> dict[str, set]:
    with compile_check.record_launches() as launches:
        for n in counts:
            call(n)
    keys: dict[str, set] = {}
    for launch in launches:
        keys.setdefault(launch.kernel.fn.__name__, set()).add(compile_check.specialization(launch))
    return keys


def test_fused_moe_compiles_once_per_config_and_alignment_variant() -> None:
    from server.moe.kernels.fused_moe import fused_moe_triton
    from server.moe.kernels.moe_align import align_variant
    from server.moe.kernels.moe_config import get_moe_config

    counts = [1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 100, 127, 128, 255, 256, 257, 1000, 2048, 4095, 4096, 4352]
    keys = keys_by_kernel(lambda t: fused_moe_triton(*compile_check.meta_moe(t)), counts)
    variants = set()
    for t in counts:
        cfg = get_moe_config(128, 2048, 768, t * 8, torch.bfloat16, torch.device("meta"))
        variants.add((cfg, align_variant(t * 8, cfg.BLOCK_M)))
    configs = {v[0] for v in variants}
    assert len(keys["_gate_up_silu_kernel"]) == len(keys["_down_scatter_kernel"]) == len(configs)
    assert len(keys["_scatter_slots_kernel"]) == len({v[1] for v in variants})
    assert len(keys["_combine_slots_kernel"]) == 1


def test_expert_row_paths_compile_once_per_config() -> None:
    from server.moe.kernels.fused_moe import expert_mlp_rows_triton, grouped_expert_mlp_triton
    from server.moe.kernels.moe_config import get_moe_config

    _, w13, w2, _, _ = compile_check.meta_moe(1, experts=32)
    rows = sorted(random.Random(0).sample(range(1, 20000), 40)) + [1, 16, 32, 512]
    grouped = keys_by_kernel(lambda r: grouped_expert_mlp_triton(torch.empty(r, 2048, **META), torch.empty(33, **I32),
                                                                 w13, w2), rows)
    configs = {get_moe_config(32, 2048, 768, r, torch.bfloat16, torch.device("meta")) for r in rows}
    assert len(grouped["_align_offsets_kernel"]) == len({c.BLOCK_M for c in configs})
    assert len(grouped["_gate_up_silu_kernel"]) == len(configs)
    unsorted = keys_by_kernel(lambda r: expert_mlp_rows_triton(torch.empty(r, 2048, **META), torch.empty(r, **I32),
                                                               w13, w2), rows)
    assert len(unsorted["_down_scatter_kernel"]) == len(configs)


def test_norm_and_routing_kernels_compile_once_for_every_token_count() -> None:
    from server.kernels.norm_rope import rms_norm_triton, rope_triton
    from server.moe.kernels.greedy_route import greedy_balanced_triton
    from server.moe.kernels.uniform_random_route import uniform_random_triton

    counts = [1, 2, 15, 16, 17, 32, 33, 64, 129, 4096]
    w = torch.empty(2048, **META)
    assert len(keys_by_kernel(lambda t: rms_norm_triton(torch.empty(t, 2048, **META), w, 1e-6), counts)
               ["_rms_norm_kernel"]) == 1
    assert len(keys_by_kernel(lambda t: rms_norm_triton(torch.empty(t, 4, 128, **META), w[:128], 1e-6), counts)
               ["_rms_norm_kernel"]) == 1  # per-head q/k norm: rows = tokens x heads
    cos = torch.empty(4096, 128, **META)
    assert len(keys_by_kernel(lambda t: rope_triton(torch.empty(t, 32, 128, **META), cos[:t], cos[:t]), counts)
               ["_rope_kernel"]) == 1
    assert len(keys_by_kernel(lambda t: greedy_balanced_triton(torch.empty(t, 128, **META), 8), counts)
               ["_greedy_balanced_kernel"]) == 1
    keys = keys_by_kernel(lambda t: [uniform_random_triton(t, 128, 8, key, t * 3, torch.device("meta"))
                                     for key in (1, 16, 12345)], counts)
    assert len(keys["_uniform_random_kernel"]) == 1


def test_attention_kernels_do_not_specialise_on_batch_shape() -> None:
    from server.kernels.attention_decode import paged_decode_attention_triton, write_kv_cache_triton
    from server.kernels.attention_prefill import prefill_attention_triton

    kc = torch.empty(512, 16, 4, 128, **META)

    def prefill(t: int) -> None:
        s = max(1, t // 64)
        prefill_attention_triton(torch.empty(t, 32, 128, **META), kc, kc, torch.empty(s, 64, **I32),
                                 torch.empty(s + 1, **I32), torch.empty(s, **I32), max_query_len=-(-t // s))
        write_kv_cache_triton(torch.empty(t, 4, 128, **META), torch.empty(t, 4, 128, **META), kc, kc,
                              torch.empty(t, device="meta", dtype=torch.int64))

    keys = keys_by_kernel(prefill, [1, 7, 16, 64, 65, 200, 1024, 4096])
    assert len(keys["_prefill_kernel"]) == len(keys["_write_kv_kernel"]) == 1
    decode = keys_by_kernel(lambda s: paged_decode_attention_triton(torch.empty(s, 32, 128, **META), kc, kc,
                                                                    torch.empty(s, 64, **I32), torch.empty(s, **I32),
                                                                    num_splits=4), [1, 3, 16, 17, 256])
    assert len(decode["_decode_split_kernel"]) == 1


def test_mla_decode_kernel_compiles_once_per_config_and_split_mode() -> None:
    """num_splits is a launch argument, so batch sizes that choose 2, 16 or 33 splits share one
    compile; only the config (per batch bucket) and whether the step splits at all select one."""
    from server.kernels.mla_decode import launch_plan, mla_decode_headblock_triton

    cache = torch.empty(4096, 16, 576, **META)
    batches = [1, 2, 3, 4, 5, 8, 16, 17, 33, 64, 65, 128, 256]

    def decode(s: int, splits: int | None = None) -> None:
        mla_decode_headblock_triton(torch.empty(s, 128, 576, **META), cache, torch.empty(s, 512, **I32),
                                    torch.empty(s, **I32), 512, 0.07, num_splits=splits)

    keys = keys_by_kernel(decode, batches)
    plans = [launch_plan(s, 128, 512, 576, 16, 512, torch.bfloat16, torch.device("meta")) for s in batches]
    assert len(keys["_mla_decode_kernel"]) == len({(cfg, splits > 1) for cfg, splits, _ in plans})
    assert len(keys["_merge_kernel"]) == len({cfg for cfg, splits, _ in plans if splits > 1}) == 1
    forced = keys_by_kernel(lambda n: decode(2, n), [2, 3, 16, 33, 128])
    assert len(forced["_mla_decode_kernel"]) == len(forced["_merge_kernel"]) == 1


def test_expanded_mla_prefill_compiles_once_for_every_prompt_shape() -> None:
    """The expanded MLA prefill kernel as the model launches it (views of q, kv_b_proj's output and
    the latent rows; whole prompts and chunks over a prefix): one compile for every token count."""
    from server.kernels.mla_prefill_expanded import mla_prefill_expanded_triton

    def prefill(t: int, prefix: int = 0) -> None:
        q, kv = torch.empty(t, 128, 192, **META), torch.empty(t + prefix, 128, 256, **META)
        rows = torch.empty(t + prefix, 576, **META)
        mla_prefill_expanded_triton(q[..., :128], q[..., 128:], kv[..., :128], rows[:, None, 512:], kv[..., 128:],
                                    torch.empty(2, **I32), torch.empty(2, **I32), 0.07, max_query_len=t)

    keys = keys_by_kernel(lambda t: (prefill(t), prefill(t, 1000)), [1, 7, 16, 64, 65, 200, 1024, 4096, 8193])
    assert len(keys["_expanded_prefill_kernel"]) == 1
