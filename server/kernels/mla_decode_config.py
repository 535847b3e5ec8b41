"""Launch parameters of the head-block MLA decode kernel (mla_decode.py): stored per device and
shape, else a heuristic; and the number of KV splits, from static shapes only.

Files live in configs/<device>_MLA_H<heads>_D<kv_lora_rank>_R<rope dims>_P<page>.json (device =
torch.cuda.get_device_name() with spaces as underscores). `scripts/bench_mla_decode.py --sweep
--write-config` writes them on the GPU it runs on:

  {"meta": {"dtype": "bfloat16", "tool": "...", ...},
   "1":   {"BLOCK_H": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "num_splits": 0,
           "min_split_tokens": 0},
   "128": {...}, ...}

Keys are batch sizes (sequences per decode step); a call uses the bucket nearest in log2.
num_splits / min_split_tokens 0 mean "from the heuristics below". Why these knobs: the kernel
is bound by how well a head block's accumulator [BLOCK_H, kv_lora_rank] fp32 fits the register
file (BLOCK_H, num_warps), by how many latent tiles are in flight (BLOCK_N, num_stages), and, at
small batches, by how many SMs the (sequence, head block) pairs leave idle (num_splits).

Nothing here reads per-step lengths: the split count depends on the batch, the head count, the
block-table width and the SM count, so a CUDA graph captured for a batch size keeps its grid.
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
from dataclasses import asdict, dataclass, fields

import torch

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"
MAX_SPLITS = 128  # bounds the partial-result workspace [B, H, MAX_SPLITS, Dv] fp32


@dataclass(frozen=True)
class MLADecodeConfig:
    BLOCK_H: int  # heads per program: the M of both tl.dots (64 = one Hopper warpgroup MMA)
    BLOCK_N: int  # latent rows per tile
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int = 0  # KV splits per (sequence, head block); 0: choose_num_splits
    min_split_tokens: int = 0  # a split covers at least this many tokens; 0: default_min_split_tokens

    def validate(self) -> None:
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name in ("num_splits", "min_split_tokens") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"MLA decode config {f.name} must be an int >= {least}, got {value!r}")
        for name in ("BLOCK_H", "BLOCK_N"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"MLA decode config {name} must be a power of two >= 16 (tl.dot), got {value}")
        if self.num_splits > MAX_SPLITS:
            raise ValueError(f"MLA decode config num_splits must be <= {MAX_SPLITS}, got {self.num_splits}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "MLADecodeConfig":
        try:
            cfg = cls(**data)
        except TypeError as exc:
            raise ValueError(f"bad MLA decode config entry {data!r}: {exc}") from exc
        cfg.validate()
        return cfg


def default_config(heads: int, v_dim: int, dtype: torch.dtype) -> MLADecodeConfig:
    """fp32 (tests, interpreter): small tiles. 16-bit, more than 16 heads: 64 heads a program
    (both products on Hopper's warpgroup MMA; every latent tile feeds 64 query rows, and with
    128 heads two neighbouring programs share it through L2), 8 warps so the [64, 512] fp32
    accumulator takes 128 registers a thread, 32-row tiles double buffered (2 x 36 KB of shared
    memory beside the 72 KB query block). Between 17 and 63 heads the padded rows cost tensor
    work only; 32-head blocks spill at 512 latent dims (compiled for sm_90). 16 heads or fewer:
    16-head blocks, which fit with 8 warps."""
    if dtype == torch.float32:
        return MLADecodeConfig(BLOCK_H=16, BLOCK_N=16, num_warps=4, num_stages=1)
    return MLADecodeConfig(BLOCK_H=16 if heads <= 16 else 64, BLOCK_N=32 if v_dim >= 256 else 64,
                           num_warps=8 if v_dim >= 256 else 4, num_stages=2)


def triton_next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 without importing triton (CPU installs import this module)."""
    return 1 << max(0, int(n) - 1).bit_length()


def default_min_split_tokens(heads: int, v_dim: int, dk: int, itemsize: int) -> int:
    """Shortest split worth its partial result: a split writes and the merge reads back
    heads x v_dim fp32 (8 bytes an element in all), so a split should read at least as many
    latent bytes (tokens x dk x itemsize); at least 256 tokens so its prologue (loading the
    query block) is amortised. DeepSeek-V3 (128 heads, 512 + 64, bf16): 512 tokens."""
    tokens = -(-heads * v_dim * 8 // (dk * itemsize))
    return max(256, triton_next_power_of_2(tokens))


def choose_num_splits(pairs: int, width_tokens: int, num_sms: int, min_split_tokens: int) -> int:
    """KV splits for `pairs` (sequence, head block) programs: as many as fill one wave of SMs
    (one resident program per SM: the accumulator takes most of the register file) without a
    partial second wave, and no more than the longest context (the block-table width) can give
    splits of min_split_tokens. Non-increasing in `pairs`, so batch sizes sharing a value form one
    run (the warm-up compiles one variant per run)."""
    if pairs >= num_sms:
        return 1
    by_sms = max(1, num_sms // max(pairs, 1))
    by_width = max(1, width_tokens // max(min_split_tokens, 1))
    return max(1, min(by_sms, by_width, MAX_SPLITS))


def device_key(device: torch.device | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3' ('cpu' without CUDA)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return "cpu"
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return torch.cuda.get_device_name(index).replace(" ", "_").replace("/", "_")


def config_path(device_name: str, heads: int, v_dim: int, rope_dim: int, page: int) -> pathlib.Path:
    return CONFIG_DIR / f"{device_name}_MLA_H{heads}_D{v_dim}_R{rope_dim}_P{page}.json"


@functools.lru_cache(maxsize=32)
def load_table(path: str) -> dict[int, MLADecodeConfig] | None:
    """{batch bucket: config} from a stored file; None when there is none."""
    p = pathlib.Path(path)
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    table = {int(k): MLADecodeConfig.from_json(v) for k, v in data.items() if k != "meta"}
    if not table:
        raise ValueError(f"{p} holds no batch buckets")
    return table


def save_table(path: pathlib.Path, table: dict[int, MLADecodeConfig], meta: dict) -> None:
    """The file load_table reads (written by the bench's sweep)."""
    for cfg in table.values():
        cfg.validate()
    body = {"meta": meta, **{str(k): v.to_json() for k, v in sorted(table.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1) + "\n")
    load_table.cache_clear()


def nearest_bucket(table: dict[int, MLADecodeConfig], batch: int) -> MLADecodeConfig:
    target = math.log2(max(batch, 1))
    return table[min(table, key=lambda b: (abs(math.log2(max(b, 1)) - target), b))]


@functools.lru_cache(maxsize=512)  # bounded; keeps file lookups off the per-call path
def get_mla_decode_config(batch: int, heads: int, v_dim: int, rope_dim: int, page: int, dtype: torch.dtype,
                          device: torch.device | None = None) -> MLADecodeConfig:
    """The stored config for this device, shape and batch (16-bit on CUDA), else default_config."""
    if dtype in (torch.bfloat16, torch.float16) and device is not None and device.type == "cuda":
        table = load_table(str(config_path(device_key(device), heads, v_dim, rope_dim, page)))
        if table is not None:
            return nearest_bucket(table, batch)
    return default_config(heads, v_dim, dtype)
