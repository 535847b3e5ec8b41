"""One decoder layer: pre-norm attention and pre-norm MLP (MoE or dense), each with a residual."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.backend import KernelBackend
from ..layers.attention import PagedAttentionMetadata
from ..layers.layernorm import RMSNorm
from ..layers.mlp import GatedMLP
from ..moe.layer import MoELayer
from ..moe.runtime import MoERuntime, MoEStepContext
from .families import MoEFamily
from .mla_attention import MLAttention
from .self_attention import SelfAttention
from .spec import ModelSpec


def router_options(spec: ModelSpec) -> dict:
    """The rule's static arguments beyond renormalisation (server/moe/router.py)."""
    if spec.router_rule == "sigmoid_group_topk":
        return {"num_groups": spec.router_groups, "topk_groups": spec.router_topk_groups,
                "scaling_factor": spec.routed_scaling_factor}
    return {}


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, family: MoEFamily, layer: int, runtime: MoERuntime, kernels: KernelBackend,
                 dtype=None, device=None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        attention = MLAttention if spec.mla is not None else SelfAttention
        self.self_attn = attention(spec, layer, kernels=kernels, **kw)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, kernels=kernels, **kw)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, kernels=kernels, **kw)
        self.is_moe = spec.is_moe_layer(layer)
        if self.is_moe:
            self.mlp = MoELayer(
                moe_index=spec.moe_index(layer), hidden=spec.hidden_size, num_experts=spec.num_experts,
                top_k=spec.top_k, intermediate=spec.moe_intermediate_size, act=spec.hidden_act, runtime=runtime,
                renormalize=spec.norm_topk_prob, float32_router_weights=family.router_float32_weights,
                router_rule=spec.router_rule, router_options=router_options(spec),
                shared_intermediate=spec.shared_expert_intermediate_size, shared_gated=spec.shared_expert_gated,
                kernels=kernels, **kw,
            )
        else:
            self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act, **kw)

    def forward(self, x: torch.Tensor, cos_sin, kv_cache, meta: PagedAttentionMetadata,
                moe_step: MoEStepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)  # [T, H]
        h = self.post_attention_layernorm(x)
        h = self.mlp(h, moe_step) if self.is_moe else self.mlp(h)
        return x + h
