"""Random weights for a model built from `model.shape` (benchmarks at real sizes, no checkpoint).

Filled on the target device with seeded generators, one stream per tensor and, for experts,
one per (layer, logical expert id): expert e gets the same weights whatever ep_size, rank or
EPLB slot holds it (copies included), so results are comparable across EP sizes and
placements. Norm weights are 1 and biases 0, as
transformers initialises them; everything else ~ N(0, initializer_range).
"""
from __future__ import annotations

import zlib

import torch

from ..layers.layernorm import RMSNorm
from .causal_lm import MoECausalLM


def _generator(device: torch.device, *key: object) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(zlib.crc32(":".join(map(str, key)).encode()))
    return g


@torch.no_grad()
def init_random_weights(model: MoECausalLM, seed: int) -> None:
    std = model.spec.initializer_range
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for name, p in model.named_parameters():
        if id(p) in norm_weights:
            p.fill_(1.0)
        elif name.endswith((".bias", ".e_score_correction_bias")):  # transformers zeroes the router bias too
            p.zero_()
        elif name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            layer = int(name.split(".")[2])  # model.layers.{i}.mlp.experts.*
            for local, e in enumerate(model.local_expert_ids(model.spec.moe_index(layer))):
                p[local].normal_(0.0, std, generator=_generator(p.device, seed, name, e))
        else:
            p.normal_(0.0, std, generator=_generator(p.device, seed, name))
