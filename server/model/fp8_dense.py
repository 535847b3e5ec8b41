"""Keep an FP8 block checkpoint's dense linears in FP8: attention projections, MLA's LoRA
projections, shared experts and the dense first layers' MLPs.

Every nn.Linear whose checkpoint weight is stored as e4m3 (the scheme's modules_to_not_convert
are stored as values, so they never are) becomes an Fp8Linear holding the codes and block scales
as stored, before the loader fills the remaining parameters. A module that reads a child's
`.weight` itself, not only through its forward, names that child in `keeps_dense_values`
(MLA's kv_b_proj, whose weight the absorbed decode splits into W_UK and W_UV); those stay
dequantised. The loader takes this path exactly where the routed experts stay FP8
(server/model/expert_format.py): a CUDA GPU with e4m3 tensor cores running the Triton kernels,
model.quantization=auto.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..layers.fp8_linear import Fp8Linear
from .fp8_reader import Fp8BlockReader

#: (parameter name "<module>.weight", the nn.Linear) -> its e4m3 codes [out, in] and block scales
#: [ceil(out/128), ceil(in/128)], or None where that linear stays values
BlockSource = Callable[[str, nn.Linear], "tuple[torch.Tensor, torch.Tensor] | None"]


def swap_fp8_linears(model: nn.Module, blocks: BlockSource, use_kernel: bool) -> int:
    """Replace the nn.Linear children of `model` that `blocks` gives FP8 blocks for by Fp8Linear
    layers holding them; returns how many. Children a module names in keeps_dense_values are
    never asked about. `use_kernel`: the Triton kernel, else its torch twin (Fp8Linear)."""
    swapped = 0
    for prefix, module in list(model.named_modules()):
        kept = getattr(module, "keeps_dense_values", ())
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child_name in kept:
                continue
            stored = blocks(f"{prefix}.{child_name}.weight" if prefix else f"{child_name}.weight", child)
            if stored is None:
                continue
            device = child.weight.device
            setattr(module, child_name, Fp8Linear(stored[0].to(device), stored[1].to(device), child.bias, use_kernel))
            swapped += 1
    return swapped


def checkpoint_blocks(reader: Fp8BlockReader, candidates: Callable[[str], list[str]]) -> BlockSource:
    """The codes and scales a checkpoint stores for a linear, where it stores them as e4m3.
    `candidates(name)`: checkpoint names to try for our parameter name (weights.checkpoint_candidates
    with the family's MoE module names)."""

    def blocks(name: str, linear: nn.Linear):
        found = [c for c in candidates(name) if reader.has(c)]
        if not found or not reader.is_fp8(found[0]):
            return None
        return reader.read_codes(found[0], tuple(linear.weight.shape), category="other")

    return blocks
