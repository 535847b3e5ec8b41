"""The wire: an alpha-beta time for each collective the EP dispatcher issues.

One GPU cannot measure the wire, so the what-if models it, per interconnect profile
(conf/interconnect/<name>.yaml, each number with its source, or a file that
scripts/calibrate_interconnect.py wrote from NCCL on the machine at hand):

  inside a node (N <= gpus_per_node)
      t = latency + (N - 1)/N * bytes / bus_bw
  across nodes (N > gpus_per_node, G = gpus_per_node; the profile's `inter` section)
      t = latency_inter + max((G - 1)/N * bytes / bus_bw_intra, (N - G)/N * bytes / bus_bw_inter)

with nccl-tests' conventions: `bytes` is the all-gather's output per rank, or the all-to-all's
buffer per rank, and bus_bw is what nccl-tests prints as busbw. At N = 1 nothing travels.

The fixed-capacity dispatch's all-gather carries each token's packed row: its hidden state in
the activation dtype, or on parallel.dispatch_wire=fp8 as e4m3 codes plus a scale per 128
channels (about half the bytes; server/moe/dispatch/wire.py); the all-to-all returns partial
sums in the activation dtype on either wire. The fp8 wire's quantise (and, for experts that are
not FP8, dequantise) run on each rank, so the what-if measures them with the rest of a rank's
local work, not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

import conf

from ...config import ConfigError
from ...moe.dispatch.wire import wire_row_bytes
from .named_yaml import read_named_yaml, shipped

INTERCONNECT_DIR = Path(conf.__file__).resolve().parent / "interconnect"
COLLECTIVES = ("all_gather", "all_to_all")


@dataclass(frozen=True)
class LinkCost:
    latency_us: float
    bus_bw_gbps: float  # GB/s (1e9 bytes per second)


@dataclass(frozen=True)
class Interconnect:
    name: str
    gpus_per_node: int
    intra: Mapping[str, LinkCost]
    inter: Mapping[str, LinkCost] | None
    source: str  # the file it came from

    def max_ep(self) -> int | None:
        """The largest EP group the profile describes (None: any)."""
        return None if self.inter is not None else self.gpus_per_node

    def seconds(self, collective: str, ep_size: int, nbytes: float) -> float:
        """Modelled time of one `collective` of `nbytes` (per rank, nccl-tests' size) over `ep_size` ranks."""
        if ep_size <= 1 or nbytes <= 0:
            return 0.0
        g = self.gpus_per_node
        intra = self.intra[collective]
        if ep_size <= g:
            return intra.latency_us * 1e-6 + (ep_size - 1) / ep_size * nbytes / (intra.bus_bw_gbps * 1e9)
        if self.inter is None:
            raise ConfigError(f"interconnect {self.name} describes one node of {g} GPUs; ep_size={ep_size} needs a "
                              "profile with an `inter` section (e.g. bench.interconnect=ib400_h100)")
        inter = self.inter[collective]
        over_nvlink = (g - 1) / ep_size * nbytes / (intra.bus_bw_gbps * 1e9)
        over_nic = (ep_size - g) / ep_size * nbytes / (inter.bus_bw_gbps * 1e9)
        return inter.latency_us * 1e-6 + max(over_nvlink, over_nic)


def layer_wire_seconds(link: Interconnect, ep_size: int, rows: int, hidden: int, top_k: int, dtype: torch.dtype,
                       wire: str = "bf16") -> float:
    """One MoE layer's all-gather of `rows` packed rows per rank (`wire`'s row bytes) and the
    all-to-all of the partial sums back, over `ep_size` ranks (seconds)."""
    gathered = ep_size * rows * wire_row_bytes(wire, hidden, top_k, dtype)
    returned = ep_size * rows * hidden * dtype.itemsize
    return link.seconds("all_gather", ep_size, gathered) + link.seconds("all_to_all", ep_size, returned)


def _links(data: Any, where: str) -> dict[str, LinkCost]:
    if not isinstance(data, Mapping) or set(data) != set(COLLECTIVES):
        raise ConfigError(f"{where} must map exactly {list(COLLECTIVES)} to {{latency_us, bus_bw_gbps}}")
    out = {}
    for name, cost in data.items():
        try:
            link = LinkCost(float(cost["latency_us"]), float(cost["bus_bw_gbps"]))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}.{name} needs numbers latency_us and bus_bw_gbps, got {cost!r}") from None
        if link.latency_us < 0 or link.bus_bw_gbps <= 0:
            raise ConfigError(f"{where}.{name}: latency_us must be >= 0 and bus_bw_gbps > 0, got {cost!r}")
        out[name] = link
    return out


def available_interconnects() -> list[str]:
    return shipped(INTERCONNECT_DIR)


def load_interconnect(name: str) -> Interconnect:
    """A shipped profile by name, or a YAML file by path (ConfigError naming what is wrong)."""
    path, data = read_named_yaml(name, INTERCONNECT_DIR, "bench.interconnect")
    data = data or {}
    where = f"interconnect {path}"
    if not isinstance(data, Mapping) or not isinstance(data.get("gpus_per_node"), int) or data["gpus_per_node"] < 1:
        raise ConfigError(f"{where}: needs gpus_per_node (a positive integer), intra and optionally inter")
    inter = data.get("inter")
    return Interconnect(name=str(data.get("name", path.stem)), gpus_per_node=data["gpus_per_node"],
                        intra=_links(data.get("intra"), f"{where}: intra"),
                        inter=None if inter is None else _links(inter, f"{where}: inter"), source=str(path))
