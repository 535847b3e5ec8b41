"""Block sizes for the block-FP8 MoE GEMMs: the tuned-config files with an _fp8 suffix, else
the bf16 heuristic with a 128-wide K step.

configs/<device>_E<E>_H<H>_I<I>_fp8.json (scripts/tune_moe_fp8.py) has the same layout as the
bf16 files (moe_config.py) and is read by the same loader; the suffix keeps an FP8 tuning from being applied to the bf16
kernels or the reverse (their best tiles differ: FP8 tiles are half the bytes).

One rule beyond MoEConfig.validate: BLOCK_K must divide 128, the K extent of one weight scale
block and of one activation scale group, because the kernels apply one (row, block) scale pair
per K step (moe_gemm_fp8.py). A stored config that breaks it is an error, not a silent fallback.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib

import torch

from .fp8_quant import GROUP
from .moe_config import CONFIG_DIR, MoEConfig, _load_table, default_config, device_key, nearest_bucket


def fp8_config_path(device_name: str, num_experts: int, hidden: int, inter: int) -> pathlib.Path:
    return CONFIG_DIR / f"{device_name}_E{num_experts}_H{hidden}_I{inter}_fp8.json"


def check_fp8_config(cfg: MoEConfig) -> MoEConfig:
    for name, gemm in (("gate_up", cfg.gate_up), ("down", cfg.down)):
        if GROUP % gemm.BLOCK_K:
            raise ValueError(f"FP8 MoE config {name}.BLOCK_K={gemm.BLOCK_K} must divide the {GROUP}-wide scale block")
    return cfg


def default_fp8_config(num_rows: int, num_experts: int) -> MoEConfig:
    """The bf16 heuristic's tiles with BLOCK_K = 128: where bf16 trims K to 64 to fit shared
    memory, e4m3 tiles of 128 take the same bytes, and one K step then covers one scale block.
    gate_up keeps BLOCK_N <= 64 from BLOCK_M 64 up: its two fp32 accumulators, plus the dot
    result each K step scales before adding, spill at 64x128 and above on sm_90 (the bf16
    kernel accumulates in place and fits)."""
    cfg = default_config(num_rows, num_experts, torch.bfloat16)
    gate_n = cfg.gate_up.BLOCK_N if cfg.BLOCK_M < 64 else min(cfg.gate_up.BLOCK_N, 64)
    return MoEConfig(cfg.BLOCK_M, dataclasses.replace(cfg.gate_up, BLOCK_N=gate_n, BLOCK_K=GROUP),
                     dataclasses.replace(cfg.down, BLOCK_K=GROUP))


@functools.lru_cache(maxsize=512)
def get_fp8_moe_config(num_experts: int, hidden: int, inter: int, num_rows: int,
                       device: torch.device | None = None) -> MoEConfig:
    """Stored FP8 config for this device/shape and routed-row count, else default_fp8_config."""
    if torch.cuda.is_available():
        loaded = _load_table(str(fp8_config_path(device_key(device), num_experts, hidden, inter)))
        if loaded is not None:
            top_k, table = loaded
            return check_fp8_config(nearest_bucket(table, num_rows / top_k))
    return default_fp8_config(num_rows, num_experts)
