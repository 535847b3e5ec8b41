"""How a model's routed experts hold their weights, chosen once when the model is built.

  values  the serving dtype (bf16/fp16/fp32); FP8 block checkpoints are dequantised on load
  fp8     the checkpoint's e4m3 codes and 128x128 fp32 block scales, run by the block-FP8 MoE
          kernels (server/moe/kernels/fused_moe_fp8.py): half the expert bytes of bf16

fp8 is taken only where every condition for it holds, so anything else keeps the dequantised
path that CPU runs, the tests' oracles and the torch baselines use:
  - the checkpoint is FP8 block-quantised with 128x128 blocks (the kernels' scale block) and
    model.quantization is auto ("dequantize" asks for values explicitly), or a random-weight
    model.shape is drawn as one (model.quantization=fp8);
  - the model runs on a CUDA GPU with e4m3 tensor cores (compute capability 8.9 or above: Ada,
    Hopper, Blackwell) with the Triton expert path (triton / triton_unsorted), the only place the
    FP8 kernels run at speed (the interpreter is for tests);
  - the expert intermediate size is a multiple of 128 (checkpoints that store gate and up
    apart are fused here by stacking their scale rows; real ones are: 768, 1408, 2048).
EPLB is no condition: its start-up placement loads every slot's codes and scales (weights.py)
and its online moves carry every tensor of a slot, scales included (server/moe/eplb/transfer.py).
"""
from __future__ import annotations

import torch

from ..kernels.backend import KernelBackend
from .spec import ModelSpec

FP8_BLOCK = (128, 128)
FP8_EXPERT_PATHS = ("triton", "triton_unsorted")
MIN_CAPABILITY = (8, 9)


def expert_weight_format(spec: ModelSpec, quantization: str, kernels: KernelBackend,
                         device: torch.device | str | None,
                         capability: tuple[int, int] | None = None) -> tuple[str, str]:
    """("fp8" | "values", why): the format of this model's expert weights and the reason, for
    the start-up log. `capability`: the CUDA device's (None: asked of torch when it matters)."""
    scheme = spec.quantization
    if scheme is None:
        return "values", "the checkpoint stores values"
    if quantization not in ("auto", "fp8"):  # fp8: a random-weight shape drawn as an FP8 checkpoint
        return "values", f"model.quantization={quantization}"
    if scheme.block != FP8_BLOCK:
        return "values", f"the FP8 kernels take {list(FP8_BLOCK)} blocks, the checkpoint has {list(scheme.block)}"
    if device is None or torch.device(device).type != "cuda":
        return "values", "FP8 expert kernels run on CUDA only"
    if capability is None:
        capability = torch.cuda.get_device_capability(torch.device(device))
    if tuple(capability) < MIN_CAPABILITY:
        return "values", f"compute capability {capability[0]}.{capability[1]} has no e4m3 tensor cores (8.9+ has)"
    if kernels.expert_path not in FP8_EXPERT_PATHS:
        return "values", f"expert path {kernels.expert_path!r} has no FP8 kernels (triton or triton_unsorted have)"
    if spec.moe_intermediate_size % FP8_BLOCK[0]:
        return "values", f"expert intermediate size {spec.moe_intermediate_size} is not a multiple of {FP8_BLOCK[0]}"
    return "fp8", "e4m3 expert weights with block scales, block-FP8 MoE kernels"
