"""bench.expert_precision: which weights the what-if's expert kernels run on.

Random-weight shapes have no checkpoint, so nothing says their experts are FP8; yet DeepSeek-V3/R1
and Qwen3 are deployed as FP8 block checkpoints, whose experts stay e4m3 on the GPU (half the
bytes of bf16), and what balance buys depends on how long a rank's expert kernel takes.

  dtype  experts in the model's dtype (model.dtype), the values path
  fp8    e4m3 codes with a float32 scale per 128x128 block, run by the engine's FP8 expert path
         (server/moe/fp8_expert_path.py): the engine's own decision (server/model/expert_format.py)
         is asked as if the shape were an FP8 block checkpoint under model.quantization=auto, and
         where it would keep values (CPU, compute capability below 8.9, a non-Triton expert path,
         an intermediate size off the block) the run stops with that reason, naming the key.
         EPLB variants run FP8 too: every slot, replicas included, holds e4m3 codes and scales.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...config import ConfigError
from ...kernels.backend import KernelBackend
from ...model.expert_format import FP8_BLOCK, expert_weight_format
from ...model.random_weights import draw_fp8_blocks
from ...model.spec import Fp8BlockScheme, ModelSpec


def expert_kernels(precision: str, spec: ModelSpec, kernels: KernelBackend, device: torch.device | str,
                   capability: tuple[int, int] | None = None, key: str = "bench.expert_precision") -> KernelBackend:
    """The kernel backend the what-if's experts are built with: `kernels` with expert_weights
    "values" (dtype) or "fp8", or ConfigError naming `key` (the setting that asked for fp8:
    bench.expert_precision or model.quantization) where fp8 cannot run. `capability`: the CUDA
    device's (None: asked of torch)."""
    if precision == "dtype":
        return replace(kernels, expert_weights="values")
    if precision != "fp8":
        raise ConfigError(f"{key}={precision!r} is not one of ('dtype', 'fp8')")
    as_checkpoint = replace(spec, quantization=Fp8BlockScheme(block=FP8_BLOCK))
    fmt, why = expert_weight_format(as_checkpoint, "auto", replace(kernels, expert_weights="values"), device,
                                    capability)
    if fmt != "fp8":
        raise ConfigError(f"{key}=fp8: the engine would not run FP8 experts here: {why}")
    return replace(kernels, expert_weights="fp8")


@torch.no_grad()
def fill_random_fp8(experts, std: float, gen: torch.Generator) -> None:
    """Random N(0, std) expert weights, quantised as an FP8 block checkpoint stores them, into
    FP8 LocalExperts (codes in gate_up_proj / down_proj, scales in *_scale_inv), slot after slot
    from the one generator `gen`."""
    for codes, scales in ((experts.gate_up_proj, experts.gate_up_proj_scale_inv),
                          (experts.down_proj, experts.down_proj_scale_inv)):
        for e in range(codes.shape[0]):
            draw_fp8_blocks(codes[e], scales[e], std, gen)  # [rows, cols] e4m3, [rows/128, cols/128] fp32


def precision_note(experts) -> str:
    """What the document says the expert kernels ran on."""
    if experts.weight_format == "fp8":
        return f"fp8 (e4m3, {FP8_BLOCK[0]}x{FP8_BLOCK[1]} block scales, {experts.path.name} expert path)"
    return f"{str(experts.act_dtype).removeprefix('torch.')} ({experts.path.name} expert path)"
