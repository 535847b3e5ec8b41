"""MLA prefill: which form runs (absorbed or expanded) and the expanded kernel's tiles.

Two forms of the same attention (server/model/mla_attention.py has the algebra):
  absorbed  every head attends over the shared latent rows [c | k_rope] (kv_lora_rank + rope
            dims) with W_UK folded into the query: per (query, key, head) 2 * (512 + 64) + 2 * 512
            FLOPs at DeepSeek-V3 widths, no per-sequence set-up. The decode form; cheap for
            short prompts and short chunks over a long cached prefix.
  expanded  the sequence's latent rows are decompressed once through kv_b_proj into per-head
            K [Lk, H, nope + rope] and V [Lk, H, v] and ordinary causal flash attention runs
            (mla_prefill_expanded.py): 2 * 192 + 2 * 128 FLOPs per (query, key, head), ~3.4x
            fewer, plus the decompression, 2 * kv_lora_rank * H * (nope + v) FLOPs per key.
The expanded form wins once each key is seen by enough queries to pay for its decompression:
a key costs 262144 * H FLOPs to decompress and saves 1536 * H per query that sees it, so at
equal efficiency ~170 queries must see it. In a whole prompt of L tokens a key is seen by
(L + 1) / 2 queries on average (break-even L ~ 340); in a chunk of q tokens over a longer
prefix, most keys by all q. `auto` compares the step's new tokens per key, sum(q_len * ctx) /
sum(ctx) (one whole prompt: L; one chunk over a long prefix: ~q, where the estimate is 2x
conservative), with EXPANDED_MIN_QUERIES_PER_KEY; scripts/bench_mla_prefill.py measures the
crossover of whole prompts on a GPU (its `crossover_len`), which is what the constant should hold.
`auto` also stays absorbed when the step's contexts hold more than EXPANDED_MAX_KEYS keys: the
decompressed K/V of one layer take keys * H * (nope + v) * 2 bytes (2 GiB at 32768 keys and
DeepSeek-V3's 128 heads), memory the KV-cache sizing does not set aside.

Tiles: a program holds BLOCK_M query rows of one head, so the fp32 accumulator is [BLOCK_M, v]
and the query [BLOCK_M, nope + rope]; K/V tiles of BLOCK_N keys stream through shared memory
(num_stages deep). 128 x 64 with 8 warps is the Hopper flash-attention shape for 128-wide heads
(two warpgroups of 64-row wgmma); files under configs/
(`<device>_MLA_PREFILL_H<heads>_QK<dqk>_V<dv>.json`, one config object, written by the bench's
--sweep --write-config) override it per device.
"""
from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from ..registry import Registry
from .mla_decode_config import CONFIG_DIR, device_key

#: queries per key (sum(q_len * ctx) / sum(ctx) over the step's sequences) from which `auto`
#: takes the expanded form: the bench's shortest whole prompt, L=128, where the expanded path
#: (decompression included) already ran 3.3x faster than the absorbed one on an H100 (at
#: L=512 7.3x; BENCHMARKS.md section 8). Shorter prompts were not measured.
EXPANDED_MIN_QUERIES_PER_KEY = 128
#: most context keys (summed over the step's sequences) `auto` decompresses at once
EXPANDED_MAX_KEYS = 32768


@dataclass(frozen=True)
class MLAPrefillConfig:
    BLOCK_M: int  # query rows (tokens of one head) per program: the M of both tl.dots
    BLOCK_N: int  # keys per K/V tile
    num_warps: int = 4
    num_stages: int = 2

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MLA prefill config {f.name} must be an int >= 1, got {value!r}")
        for name in ("BLOCK_M", "BLOCK_N"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"MLA prefill config {name} must be a power of two >= 16 (tl.dot), got {value}")

    def to_json(self) -> dict:
        return asdict(self)


def default_config(dtype: torch.dtype) -> MLAPrefillConfig:
    """fp32 (tests, interpreter): 16 x 16 tiles. 16-bit: 128 query rows x 64 keys, 8 warps, 3
    stages: compiled for sm_90 at DeepSeek-V3 widths, the query block (48 KB) and three K/V
    stages (3 x (24 + 16) KB) take 168 KB of shared memory, 197 registers, no spills, every dot
    on wgmma (tests/kernels/test_kernels_compile_sm90.py). 4 warps with 128 rows spill."""
    if dtype == torch.float32:
        return MLAPrefillConfig(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    return MLAPrefillConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def config_path(device_name: str, heads: int, dqk: int, dv: int) -> pathlib.Path:
    return CONFIG_DIR / f"{device_name}_MLA_PREFILL_H{heads}_QK{dqk}_V{dv}.json"


def save_config(path: pathlib.Path, cfg: MLAPrefillConfig, meta: dict) -> None:
    cfg.validate()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "config": cfg.to_json()}, indent=1) + "\n")
    get_mla_prefill_config.cache_clear()


@functools.lru_cache(maxsize=64)
def get_mla_prefill_config(heads: int, dqk: int, dv: int, dtype: torch.dtype,
                           device: torch.device | None = None) -> MLAPrefillConfig:
    """The stored config for this device and shape (16-bit on CUDA), else default_config."""
    if dtype in (torch.bfloat16, torch.float16) and device is not None and device.type == "cuda":
        path = config_path(device_key(device), heads, dqk, dv)
        if path.exists():
            cfg = MLAPrefillConfig(**json.loads(path.read_text())["config"])
            cfg.validate()
            return cfg
    return default_config(dtype)


def _auto(queries_per_key: float, keys: int) -> bool:
    return queries_per_key >= EXPANDED_MIN_QUERIES_PER_KEY and keys <= EXPANDED_MAX_KEYS


#: kernels.mla_prefill (EPSERVE_MLA_PREFILL) -> does a prefill step with this many queries per key
#: and context keys in all run the expanded form? Read on the Triton backend only; the torch
#: backend's loop is absorbed.
MLA_PREFILL_MODES: Registry[Callable[[float, int], bool]] = Registry("MLA prefill mode")
MLA_PREFILL_MODES.register("absorbed", lambda queries_per_key, keys: False)
MLA_PREFILL_MODES.register("expanded", lambda queries_per_key, keys: True)
MLA_PREFILL_MODES.register("auto", _auto)
DEFAULT_MLA_PREFILL = "auto"
