"""Launch parameters of the head-block MLA decode kernel (server/kernels/mla_decode_config.py):
the defaults, the static split choice, and the stored per-device files (no GPU needed)."""
from __future__ import annotations

import json

import pytest
import torch

from server.kernels import mla_decode_config as mdc
from server.kernels.mla_decode_config import MLADecodeConfig


def test_defaults_put_64_heads_on_a_program_for_wide_models() -> None:
    ds = mdc.default_config(128, 512, torch.bfloat16)
    assert (ds.BLOCK_H, ds.BLOCK_N, ds.num_warps, ds.num_stages, ds.num_splits) == (64, 32, 8, 2, 0)
    sixteen = mdc.default_config(16, 512, torch.bfloat16)  # no padded rows for 16 heads
    assert (sixteen.BLOCK_H, sixteen.BLOCK_N, sixteen.num_warps) == (16, 32, 8)
    assert mdc.default_config(20, 512, torch.float16).BLOCK_H == 64  # 32-head blocks spill
    small = mdc.default_config(128, 32, torch.float32)
    assert (small.BLOCK_H, small.BLOCK_N) == (16, 16)
    for heads in (1, 16, 64, 128):
        mdc.default_config(heads, 512, torch.bfloat16).validate()


def test_min_split_tokens_pays_for_the_partial_results() -> None:
    # DeepSeek-V3: a split's partial output (128 x 512 fp32, written and read) = 512 KB; 512 bf16
    # rows of 576 are 576 KB, 256 are not enough
    assert mdc.default_min_split_tokens(128, 512, 576, 2) == 512
    assert mdc.default_min_split_tokens(16, 512, 576, 2) == 256  # the floor
    assert mdc.default_min_split_tokens(128, 512, 576, 4) == 256


@pytest.mark.parametrize("sms", [4, 132])
def test_split_choice_fills_one_wave_and_is_monotone(sms: int) -> None:
    width, min_tokens = 32768, 512
    splits = [mdc.choose_num_splits(p, width, sms, min_tokens) for p in range(1, 3 * sms)]
    assert all(a >= b for a, b in zip(splits, splits[1:]))  # one run per value (the warm-up relies on it)
    for pairs, n in enumerate(splits, start=1):
        assert n >= 1 and (pairs * n <= sms or n == 1)  # never a partial second wave made by splitting
        if pairs < sms:
            assert pairs * (n + 1) > sms or n == width // min_tokens or n == mdc.MAX_SPLITS
    assert mdc.choose_num_splits(2, 1024, 132, 512) == 2  # short block tables cap the splits
    assert mdc.choose_num_splits(2, 100, 132, 512) == 1
    assert mdc.choose_num_splits(1, 1 << 30, 1000, 1) == mdc.MAX_SPLITS


def test_validation_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="BLOCK_H must be a power of two >= 16"):
        MLADecodeConfig(BLOCK_H=48, BLOCK_N=32).validate()
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two >= 16"):
        MLADecodeConfig(BLOCK_H=64, BLOCK_N=8).validate()
    with pytest.raises(ValueError, match="num_warps must be an int >= 1"):
        MLADecodeConfig(BLOCK_H=64, BLOCK_N=32, num_warps=0).validate()
    with pytest.raises(ValueError, match="num_splits must be <= 128"):
        MLADecodeConfig(BLOCK_H=64, BLOCK_N=32, num_splits=129).validate()
    with pytest.raises(ValueError, match="bad MLA decode config entry"):
        MLADecodeConfig.from_json({"BLOCK_H": 64, "BLOCK_N": 32, "BLOCK_K": 64})


def test_stored_table_round_trips_and_picks_the_nearest_bucket(tmp_path, monkeypatch) -> None:
    table = {1: MLADecodeConfig(64, 64, 8, 2, num_splits=32), 16: MLADecodeConfig(64, 32, 8, 3),
             128: MLADecodeConfig(32, 32, 4, 2, min_split_tokens=1024)}
    path = tmp_path / "X_MLA_H128_D512_R64_P16.json"
    mdc.save_table(path, table, {"dtype": "bfloat16"})
    assert json.loads(path.read_text())["meta"] == {"dtype": "bfloat16"}
    loaded = mdc.load_table(str(path))
    assert loaded == table
    assert mdc.nearest_bucket(loaded, 3) == table[1] and mdc.nearest_bucket(loaded, 5) == table[16]
    assert mdc.nearest_bucket(loaded, 1000) == table[128]
    assert mdc.config_path("NVIDIA_H200", 128, 512, 64, 16).name == "NVIDIA_H200_MLA_H128_D512_R64_P16.json"
    # stored files apply to 16-bit CUDA launches only; elsewhere the defaults
    monkeypatch.setattr(mdc, "CONFIG_DIR", tmp_path)
    mdc.get_mla_decode_config.cache_clear()
    assert mdc.get_mla_decode_config(3, 128, 512, 64, 16, torch.bfloat16, torch.device("cpu")) == \
        mdc.default_config(128, 512, torch.bfloat16)
    empty = tmp_path / "empty.json"
    empty.write_text('{"meta": {}}')
    with pytest.raises(ValueError, match="holds no batch buckets"):
        mdc.load_table(str(empty))


def test_launch_plan_depends_on_static_shapes_only() -> None:
    """The split count comes from the batch, the heads and the block-table width: the function
    has no context-length input at all, and the same shapes always give the same launch."""
    pytest.importorskip("triton")
    from server.kernels.mla_decode import launch_plan

    cpu = torch.device("cpu")  # 4 "SMs"
    cfg, splits, min_tokens = launch_plan(1, 16, 32, 48, 16, 64, torch.float32, cpu)
    assert (cfg.BLOCK_H, splits, min_tokens) == (16, 4, 256)
    assert launch_plan(4, 16, 32, 48, 16, 64, torch.float32, cpu)[1] == 1  # 4 programs fill the 4 SMs
    assert launch_plan(1, 16, 32, 48, 16, 8, torch.float32, cpu)[1] == 1  # 128-token tables: one split
    assert launch_plan(2, 4, 32, 48, 8, 65, torch.float32, cpu)[1] == 2  # the interpreter test's default case
    assert launch_plan(1, 16, 32, 48, 16, 64, torch.float32, cpu, num_splits=7)[1] == 7
    with pytest.raises(ValueError, match="num_splits must be in"):
        launch_plan(1, 16, 32, 48, 16, 64, torch.float32, cpu, num_splits=0)
