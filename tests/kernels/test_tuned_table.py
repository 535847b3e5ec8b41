"""A tuning run keeps a tuned fused-MoE config only for the token buckets where it measured faster
than the default; the others store the default config, so the nearest-bucket lookup never
hands their tokens to a slower or a neighbour's config. Pure logic: no GPU, no Triton."""
from __future__ import annotations

import math

import torch

from server.moe.kernels.moe_config import GemmConfig, MoEConfig, default_config, nearest_bucket
from server.moe.kernels.tuned_table import BucketResult, kept_config, tuned_table

TUNED = MoEConfig(16, GemmConfig(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=4),
                  GemmConfig(BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=5))


def _result(tokens: int, tuned_us: float, default_us: float, tuned: MoEConfig = TUNED) -> BucketResult:
    default = default_config(tokens * 8, 128, torch.bfloat16)
    return BucketResult(tuned=tuned, default=default, tuned_us=tuned_us, default_us=default_us,
                        parts={"align_us": 30.0, "tried": 19})


def test_slower_tuned_configs_give_way_to_the_default():
    # the committed H100 file's first two buckets: the search's pick ran slower than the heuristic
    results = {1: _result(1, 247.04, 229.47), 8: _result(8, 237.09, 230.98), 2048: _result(2048, 630.27, 693.54)}
    table, timings = tuned_table(results)
    assert table["1"] == results[1].default.to_json() and table["8"] == results[8].default.to_json()
    assert table["2048"] == TUNED.to_json()
    assert [timings[t]["kept"] for t in ("1", "8", "2048")] == ["default", "default", "tuned"]
    assert timings["1"] == {"tuned": 247.04, "default": 229.47, "align_us": 30.0, "tried": 19, "kept": "default"}
    # what the runtime then picks for 1 token: the default, not the tuned neighbour
    stored = {int(t): MoEConfig.from_json(c) for t, c in table.items()}
    assert nearest_bucket(stored, 1) == results[1].default


def test_ties_and_failed_timings_keep_the_default():
    assert kept_config(_result(64, 100.0, 100.0)) == (_result(64, 0, 0).default, "default")
    assert kept_config(_result(64, math.nan, 100.0))[1] == "default"
    assert kept_config(_result(64, 99.0, math.inf))[1] == "default"
    assert kept_config(_result(64, 99.9, 100.0)) == (TUNED, "tuned")


def test_a_search_that_ends_on_the_default_is_labelled_default():
    default = default_config(64 * 8, 128, torch.bfloat16)
    assert kept_config(_result(64, 90.0, 100.0, tuned=default)) == (default, "default")
