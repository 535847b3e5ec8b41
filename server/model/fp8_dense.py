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

import logging

from torch import nn

from ..layers.fp8_linear import Fp8Linear
from .fp8_reader import Fp8BlockReader

log = logging.getLogger(__name__)


def swap_fp8_linears(model: nn.Module, reader: Fp8BlockReader, candidates, use_kernel: bool) -> int:
    """Replace the FP8-stored nn.Linear children of `model` by Fp8Linear layers filled from
    `reader`; returns how many. `candidates(name)`: checkpoint names to try for our parameter
    name (weights.checkpoint_candidates with the family's MoE module names)."""
    swapped = 0
    for prefix, module in list(model.named_modules()):
        kept = getattr(module, "keeps_dense_values", ())
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child_name in kept:
                continue
            name = f"{prefix}.{child_name}.weight" if prefix else f"{child_name}.weight"
            found = [c for c in candidates(name) if reader.has(c)]
            if not found or not reader.is_fp8(found[0]):
                continue
            codes, scales = reader.read_codes(found[0], tuple(child.weight.shape), category="other")
            device = child.weight.device
            setattr(module, child_name, Fp8Linear(codes.to(device), scales.to(device), child.bias, use_kernel))
            swapped += 1
    return swapped
