"""Block sizes for the fused-MoE kernels: stored per device and shape, else a heuristic.

Files live in configs/<device>_E<E>_H<H>_I<I>.json (device = torch.cuda.get_device_name()
with spaces as underscores; E = local experts). scripts/tune_moe.py writes them:

  {"meta": {"top_k": 8, "dtype": "bfloat16", "tool": "...", ...},
   "1":    {"BLOCK_M": 16, "gate_up": {GEMM}, "down": {GEMM}},
   "128":  {...}, ...}
  GEMM = {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}

Keys are token counts T (T*top_k routed rows); a call uses the bucket nearest in log2 of
its row count. BLOCK_M is shared by the alignment and both GEMMs; the two GEMMs have their
own N/K tiles because their shapes differ (gate_up: N=I, K=H; down: N=H, K=I).
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
from dataclasses import asdict, dataclass

import torch

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoEConfig:
    BLOCK_M: int
    gate_up: GemmConfig
    down: GemmConfig

    def to_json(self) -> dict:
        return {"BLOCK_M": self.BLOCK_M, "gate_up": asdict(self.gate_up), "down": asdict(self.down)}

    @classmethod
    def from_json(cls, data: dict) -> "MoEConfig":
        try:
            cfg = cls(int(data["BLOCK_M"]), GemmConfig(**data["gate_up"]), GemmConfig(**data["down"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad MoE kernel config entry {data!r}: {exc}") from exc
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name, value in [("BLOCK_M", self.BLOCK_M), *[(f"gate_up.{k}", v) for k, v in asdict(self.gate_up).items()],
                            *[(f"down.{k}", v) for k, v in asdict(self.down).items()]]:
            if value <= 0:
                raise ValueError(f"MoE config {name} must be positive, got {value}")
        for name, value in [("BLOCK_M", self.BLOCK_M), ("gate_up.BLOCK_N", self.gate_up.BLOCK_N),
                            ("gate_up.BLOCK_K", self.gate_up.BLOCK_K), ("down.BLOCK_N", self.down.BLOCK_N),
                            ("down.BLOCK_K", self.down.BLOCK_K)]:
            if value < 16 or value & (value - 1):
                raise ValueError(f"MoE config {name} must be a power of two >= 16, got {value}")


def device_key(device: torch.device | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3' ('cpu' without CUDA)."""
    if not torch.cuda.is_available():
        return "cpu"
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return _device_name(index)


@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_").replace("/", "_")


def config_path(device_name: str, num_experts: int, hidden: int, inter: int) -> pathlib.Path:
    return CONFIG_DIR / f"{device_name}_E{num_experts}_H{hidden}_I{inter}.json"


@functools.lru_cache(maxsize=64)
def _load_table(path: str) -> tuple[int, dict[int, MoEConfig]] | None:
    p = pathlib.Path(path)
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    top_k = int(data.get("meta", {}).get("top_k", 8))
    table = {int(k): MoEConfig.from_json(v) for k, v in data.items() if k != "meta"}
    if not table:
        raise ValueError(f"{p} holds no token buckets")
    return top_k, table


def default_config(num_rows: int, num_experts: int, dtype: torch.dtype) -> MoEConfig:
    """Heuristic by routed rows per expert (memory-bound below ~64, compute-bound above)."""
    per_expert = num_rows / max(num_experts, 1)
    if dtype == torch.float32:  # 4-byte tiles: keep shared memory per stage small
        g = GemmConfig(BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)
        return MoEConfig(16 if per_expert <= 16 else 64, g, g)
    if per_expert <= 16:  # decode: stream weights, many N tiles for parallelism
        g = GemmConfig(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
        return MoEConfig(16, g, g)
    if per_expert <= 64:
        g = GemmConfig(BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
        return MoEConfig(32 if per_expert <= 32 else 64, g, g)
    if per_expert <= 256:
        g = GemmConfig(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
        return MoEConfig(64, g, g)
    return MoEConfig(128, GemmConfig(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
                     GemmConfig(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4))


def nearest_bucket(table: dict[int, MoEConfig], num_tokens: float) -> MoEConfig:
    target = math.log2(max(num_tokens, 1.0))
    return table[min(table, key=lambda t: (abs(math.log2(max(t, 1)) - target), t))]


@functools.lru_cache(maxsize=512)  # bounded; keeps file lookups off the per-call path
def get_moe_config(num_experts: int, hidden: int, inter: int, num_rows: int, dtype: torch.dtype,
                   device: torch.device | None = None) -> MoEConfig:
    """Stored config for this device/shape and routed-row count, else default_config."""
    if dtype in (torch.bfloat16, torch.float16) and torch.cuda.is_available():
        loaded = _load_table(str(config_path(device_key(device), num_experts, hidden, inter)))
        if loaded is not None:
            top_k, table = loaded
            return nearest_bucket(table, num_rows / top_k)
    return default_config(num_rows, num_experts, dtype)
