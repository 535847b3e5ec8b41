"""The attention block of a decoder layer: projections, the family's q/k norm and clipping,
RoPE, then paged attention over the sequence's KV cache (server/layers/attention.py)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.backend import KernelBackend
from ..layers.attention import PagedAttentionMetadata, paged_attention
from ..layers.layernorm import RMSNorm
from .spec import ModelSpec


class SelfAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype=None, device=None, kernels: KernelBackend | None = None) -> None:
        super().__init__()
        h, nq, nkv, d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        kernels = kernels or KernelBackend.for_device(device)
        kw = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(h, nq * d, bias=spec.qkv_bias, **kw)
        self.k_proj = nn.Linear(h, nkv * d, bias=spec.qkv_bias, **kw)
        self.v_proj = nn.Linear(h, nkv * d, bias=spec.qkv_bias, **kw)
        self.o_proj = nn.Linear(nq * d, h, bias=spec.o_bias, **kw)
        self.qk_norm = spec.qk_norm
        if spec.qk_norm == "per_head":  # Qwen3: over head_dim, each head separately
            self.q_norm = RMSNorm(d, spec.rms_norm_eps, kernels=kernels, **kw)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps, kernels=kernels, **kw)
        elif spec.qk_norm == "full":  # OLMoE: over the whole projection, before the head split
            self.q_norm = RMSNorm(nq * d, spec.rms_norm_eps, kernels=kernels, **kw)
            self.k_norm = RMSNorm(nkv * d, spec.rms_norm_eps, kernels=kernels, **kw)
        elif spec.qk_norm != "none":
            raise ValueError(f"unknown qk_norm {spec.qk_norm!r}")
        self.clip_qkv = spec.clip_qkv
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nkv, d
        self.scale = d ** -0.5
        self.window = spec.sliding_windows[layer]
        self.rope = kernels.op("rope")  # x [T, heads, D], cos/sin [T, D] -> x*cos + rotate_half(x)*sin

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # [T, D] each
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: PagedAttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, Hq*D], [T, Hkv*D] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))
