"""Which kernels a model runs: chosen once, when the model is built.

The serving path passes the `kernels.*` config keys (server/launch_plan.py resolves them once,
their environment overrides applied and logged); "auto" then follows the model's device and
whether Triton imports. A model built without them (tools, tests) reads the same environment
variables at that moment (never per call):
  EPSERVE_KERNEL_BACKEND  "torch": the torch twins on GPU too (baselines); "triton": the
                          kernels, also on CPU under Triton's interpreter (tests); "grouped_mm":
                          the MoE ops through torch._grouped_mm, every other op through its twin.
                          Unset: "triton" on CUDA when Triton imports, else "torch".
  EPSERVE_EXPERT_PATH     how routed experts run (server/moe/experts.py EXPERT_PATHS); unset:
                          the path of the kernel backend's name.
  EPSERVE_MLA_DECODE      MLA decode on the Triton backend: "triton_decode" (the decode-only
                          head-block kernel, mla_decode.py; default), "triton" (the varlen MLA
                          kernel of mla_attention.py, kept for comparison) or "dense" (batched
                          torch matmuls).
  EPSERVE_MLA_PREFILL     MLA prefill on the Triton backend (mla_prefill_config.py):
                          "absorbed" (the latent-cache kernel of mla_attention.py), "expanded"
                          (K/V decompressed, flash attention: mla_prefill_expanded.py) or "auto"
                          (default: expanded from EXPANDED_MIN_QUERIES_PER_KEY queries per key).
Modules keep the callables `op()` returns, so a forward step resolves nothing, reads no
environment and imports nothing. An op without an implementation for the chosen backend
(grouped_mm has only the MoE ops) runs its torch twin.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..registry import UnknownNameError
from .availability import BACKEND_ENV, default_backend
from .mla_prefill_config import DEFAULT_MLA_PREFILL, MLA_PREFILL_MODES
from .ops import KERNEL_OPS

EXPERT_PATH_ENV = "EPSERVE_EXPERT_PATH"
MLA_DECODE_ENV = "EPSERVE_MLA_DECODE"
MLA_PREFILL_ENV = "EPSERVE_MLA_PREFILL"
KERNEL_BACKENDS = ("torch", "triton", "grouped_mm")
MLA_DECODE_BACKENDS = ("triton_decode", "triton", "dense")
DEFAULT_MLA_DECODE = MLA_DECODE_BACKENDS[0]
EXPERT_WEIGHTS = ("values", "fp8")


@dataclass(frozen=True)
class KernelBackend:
    name: str  # one of KERNEL_BACKENDS
    expert_path: str = ""  # EXPERT_PATHS name; "": the one named like the backend
    mla_decode: str = DEFAULT_MLA_DECODE  # one of MLA_DECODE_BACKENDS (MLA decode on the Triton backend)
    #: routed experts' weights: "values" (serving dtype) or "fp8" (e4m3 + block scales; the loader
    #: sets it, server/model/expert_format.py)
    expert_weights: str = "values"
    mla_prefill: str = DEFAULT_MLA_PREFILL  # a MLA_PREFILL_MODES name (MLA prefill on the Triton backend)

    def __post_init__(self) -> None:
        if self.name not in KERNEL_BACKENDS:
            raise UnknownNameError("kernel backend", self.name, KERNEL_BACKENDS, scope=BACKEND_ENV)
        if self.mla_decode not in MLA_DECODE_BACKENDS:
            raise UnknownNameError("MLA decode backend", self.mla_decode, MLA_DECODE_BACKENDS, scope=MLA_DECODE_ENV)
        if self.mla_prefill not in MLA_PREFILL_MODES:
            raise UnknownNameError("MLA prefill mode", self.mla_prefill, MLA_PREFILL_MODES.names(),
                                   scope=MLA_PREFILL_ENV)
        if self.expert_weights not in EXPERT_WEIGHTS:
            raise UnknownNameError("expert weight format", self.expert_weights, EXPERT_WEIGHTS)
        if not self.expert_path:
            object.__setattr__(self, "expert_path", self.name)

    @classmethod
    def for_device(cls, device: torch.device | str | None = None, config=None) -> "KernelBackend":
        """The backend for a model on `device` (None: CPU). `config`: the resolved `kernels.*`
        keys (server.config.KernelConfig); None reads the environment variables now."""
        if config is not None:
            name = default_backend(device) if config.backend == "auto" else config.backend
            return cls(name, "" if config.expert_path == "auto" else config.expert_path, config.mla_decode,
                       mla_prefill=config.mla_prefill)
        return cls(default_backend(device), os.environ.get(EXPERT_PATH_ENV, "").strip(),
                   os.environ.get(MLA_DECODE_ENV, "").strip() or DEFAULT_MLA_DECODE,
                   mla_prefill=os.environ.get(MLA_PREFILL_ENV, "").strip() or DEFAULT_MLA_PREFILL)

    def op(self, name: str) -> Callable:
        """The implementation of kernel op `name` for this backend (its torch twin where it has none)."""
        impls = KERNEL_OPS[name]
        return impls[self.name if self.name in impls else "torch"]
