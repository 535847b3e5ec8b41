"""Random weights for a model built from `model.shape` (benchmarks at real sizes, no checkpoint).

Filled on the target device with seeded generators, one stream per tensor and, for experts,
one per (layer, logical expert id): expert e gets the same weights whatever ep_size, rank or
EPLB slot holds it (copies included), so results are comparable across EP sizes and
placements. Norm weights are 1 and biases 0, as
transformers initialises them; everything else ~ N(0, initializer_range). Experts kept as FP8
blocks (a shape whose quantization_config is FP8, on a GPU that runs them) draw the same way in
float32 and store e4m3 codes with their block scales, both from that per-expert stream, so every
copy of an expert holds the same codes and scales too. Where the experts are FP8, so are the dense
linears an FP8 checkpoint quantises (attention and MLA projections, shared experts, dense MLPs;
not the embedding, head or router gate): Fp8Linear layers with codes and scales drawn the same way
(model.quantization=fp8 gives a shape that quantization_config, RANDOM_FP8_CONFIG).
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

from ..layers.layernorm import RMSNorm
from .causal_lm import MoECausalLM
from .fp8_dense import swap_fp8_linears

#: the quantization_config a model.shape takes under model.quantization=fp8 (DeepSeek-V3's scheme)
RANDOM_FP8_CONFIG = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic",
                     "fmt": "e4m3"}
#: linears an FP8 block checkpoint keeps as values: the output head and the MoE routers' gates
_NEVER_FP8 = ("lm_head", ".mlp.gate", ".mlp.shared_expert_gate")


def _generator(device: torch.device, *key: object) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(zlib.crc32(":".join(map(str, key)).encode()))
    return g


@torch.no_grad()
def init_random_weights(model: MoECausalLM, seed: int) -> None:
    std = model.spec.initializer_range
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    params = dict(model.named_parameters())
    for name, p in params.items():
        if id(p) in norm_weights:
            p.fill_(1.0)
        elif name.endswith((".bias", ".e_score_correction_bias")):  # transformers zeroes the router bias too
            p.zero_()
        elif name.endswith((".experts.gate_up_proj_scale_inv", ".experts.down_proj_scale_inv")):
            continue  # drawn with their codes, below
        elif name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            layer = int(name.split(".")[2])  # model.layers.{i}.mlp.experts.*
            scales = params.get(name + "_scale_inv")  # [S, rows/128, cols/128] when the experts are FP8
            for local, e in enumerate(model.local_expert_ids(model.spec.moe_index(layer))):
                gen = _generator(p.device, seed, name, e)
                if scales is None:
                    p[local].normal_(0.0, std, generator=gen)
                else:
                    draw_fp8_blocks(p[local], scales[local], std, gen)
        else:
            p.normal_(0.0, std, generator=_generator(p.device, seed, name))
    if model.spec.quantization is not None and model.kernels.expert_weights == "fp8":
        _random_fp8_linears(model, seed, std)


def _random_fp8_linears(model: MoECausalLM, seed: int, std: float) -> None:
    """Every dense nn.Linear an FP8 checkpoint would store as e4m3 becomes an Fp8Linear with codes
    and block scales from its own seeded stream (fp8_dense.swap_fp8_linears, as for checkpoints)."""

    def blocks(name: str, linear: nn.Linear):
        if name.removesuffix(".weight").endswith(_NEVER_FP8):
            return None
        w = linear.weight  # [out, in]
        codes = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
        scales = torch.empty(-(-w.shape[0] // 128), -(-w.shape[1] // 128), dtype=torch.float32, device=w.device)
        draw_fp8_blocks(codes, scales, std, _generator(w.device, seed, name))
        return codes, scales

    swap_fp8_linears(model, blocks, use_kernel=model.kernels.name == "triton")


def draw_fp8_blocks(codes: torch.Tensor, scales: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """One slot's FP8 tensor: codes [rows, cols] e4m3 and scales [ceil(rows/128), ceil(cols/128)]
    from a float32 N(0, std) draw, block-quantised as an FP8 checkpoint stores it. One slot at a
    time: a float copy of all of a rank's experts would be 4x their FP8 bytes."""
    from ..moe.kernels.moe_reference_fp8 import quantize_weight_blocks  # FP8 experts only

    w = torch.empty(codes.shape, dtype=torch.float32, device=codes.device).normal_(0.0, std, generator=gen)
    q, s = quantize_weight_blocks(w)
    codes.copy_(q)
    scales.copy_(s)
