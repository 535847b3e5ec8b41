"""KV-cache sizing: a fixed engine.kv_cache_tokens on CPU; on CUDA the fraction
engine.gpu_memory_utilization of device memory left after the weights, the same block count on
every EP rank, and the result printed at start-up."""
from __future__ import annotations

import pytest
import torch

from server.config import AppConfig, ConfigError, EngineConfig
from server.launch_plan import build_launch_plan
from server.kernels.mla_prefill_config import EXPANDED_MAX_KEYS
from server.worker.kv_sizing import activation_headroom, block_bytes, blocks_from_memory, kv_cache_size
from server.worker.rank import build_runner

GiB = 1 << 30


def test_blocks_fill_the_fraction_left_after_what_is_in_use():
    # 80 GiB device, 30 GiB in use (weights), 0.9 -> 72 - 30 - 2 headroom = 40 GiB of 1 MiB blocks
    assert blocks_from_memory(free=50 * GiB, total=80 * GiB, utilization=0.9, block_bytes=1 << 20,
                              headroom=2 * GiB) == 40 * 1024
    assert blocks_from_memory(free=5 * GiB, total=80 * GiB, utilization=0.9, block_bytes=1 << 20, headroom=2 * GiB) == 0


def test_block_bytes_match_the_cache_the_model_allocates():
    plan = build_launch_plan(AppConfig.from_dict({}))
    runner = build_runner(plan, 0, torch.device("cpu"), None)
    cache = runner.model.allocate_kv_cache(3, 16)
    allocated = sum(t.numel() * t.element_size() for layer in cache for t in layer)
    assert block_bytes(runner.model.spec, 16, runner.model.dtype) * 3 == allocated
    assert activation_headroom(runner.model.spec, plan.app.engine) > 0


def test_headroom_holds_mla_expanded_prefill_context():
    """DeepSeek-V3's shape: the expanded prefill decompresses up to EXPANDED_MAX_KEYS context rows
    a step into 128 heads x (128 + 128) values beside the 576-wide latent rows: 2.2 GB in bf16."""
    from dataclasses import replace
    from pathlib import Path

    import yaml

    from server.config import ModelConfig
    from server.model.loader import read_model_spec

    shape = yaml.safe_load((Path(__file__).parents[2] / "conf/model/deepseek_v3.yaml").read_text())["shape"]
    spec, engine = read_model_spec(ModelConfig(name="deepseek_v3", shape=shape)), EngineConfig()
    assert spec.mla is not None and spec.num_heads == 128
    extra = activation_headroom(spec, engine, 2) - activation_headroom(replace(spec, mla=None), engine, 2)
    assert extra == EXPANDED_MAX_KEYS * (512 + 64 + 128 * (128 + 128)) * 2
    assert 2.1e9 < extra < 2.3e9


def test_cpu_keeps_the_fixed_cache_and_reports_concurrency():
    app = AppConfig.from_dict({"engine": {"kv_cache_tokens": 4096, "kv_block_size": 16, "max_num_seqs": 64},
                               "model": {"max_model_len": 1024}})
    runner = build_runner(build_launch_plan(app), 0, torch.device("cpu"), None)
    kv = runner.kv_size
    assert (kv.num_blocks, kv.source) == (256, "fixed")
    assert runner.kv_caches[0][0].shape[0] == 256
    assert kv.max_concurrency(1024, 64) == 4  # 64 blocks per 1024-token sequence
    line = kv.describe(1024, 64, ep_size=2)
    assert "256 blocks x 16 tokens = 4096 tokens" in line and "4 sequences per rank, 8 in all" in line


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "most"])
def test_utilization_outside_0_1_is_a_config_error(value):
    with pytest.raises(ConfigError, match="engine.gpu_memory_utilization"):
        AppConfig.from_dict({"engine": {"gpu_memory_utilization": value}})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_fills_the_requested_fraction():
    app = AppConfig.from_dict({"engine": {"gpu_memory_utilization": 0.5, "warmup": False}})
    device = torch.device("cuda")
    plan = build_launch_plan(app)
    runner = build_runner(plan, 0, device, None)
    kv = runner.kv_size
    free, total = torch.cuda.mem_get_info(device)
    assert kv.source == "memory" and kv.num_blocks > app.engine.kv_cache_tokens // app.engine.kv_block_size
    assert torch.cuda.memory_allocated(device) <= 0.5 * total  # the cache stayed inside the fraction
    fixed = kv_cache_size(runner.model, EngineConfig(gpu_memory_utilization=0), device)
    assert fixed.source == "fixed" and fixed.num_blocks == EngineConfig().kv_cache_tokens // 16
