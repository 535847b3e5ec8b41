"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over a cache of compressed latents.

transformers' DeepseekV3Attention caches the compressed KV (kv_lora_rank values, after
kv_a_layernorm) and the RoPE key (qk_rope_head_dim) per token, then expands every cached
token through kv_b_proj into per-head keys and values at each step. Here the cache holds the
same latent row [c | k_rope], and kv_b_proj is absorbed instead:

    k_nope[j, h] = W_UK[h] c[j]      ->  q_nope[t, h] . k_nope[j, h] = (W_UK[h]^T q_nope[t, h]) . c[j]
    v[j, h]      = W_UV[h] c[j]      ->  sum_j p[t, h, j] v[j, h]    = W_UV[h] (sum_j p[t, h, j] c[j])

so each head's query becomes [W_UK^T q_nope | q_rope] (kv_lora_rank + rope dims), every head
attends over the same latent rows (multi-query attention with one shared head), and W_UV is
applied once to the attention output. Decode then reads kv_lora_rank + rope values per cached
token instead of 2 * H * head_dim: the reason MLA exists. W_UK / W_UV are views of kv_b_proj's
weight (nothing copied: checkpoints and the transformers baseline see kv_b_proj as is).

The attention itself is the step metadata's `attend_latent` (server/layers/attention.py: the
torch loop; server/layers/attention_triton.py: the Triton kernels). Decode on the Triton
backend runs the kernel backend's `mla_decode` (kernels.mla_decode, or EPSERVE_MLA_DECODE:
server/kernels/backend.py), fixed when the layer is built: "triton_decode" (the decode-only
head-block kernel, default), "triton" (the varlen MLA kernel) or "dense" (batched torch
matmuls); scripts/bench_mla_decode.py times all three.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.backend import KernelBackend
from ..kernels.ops import KERNEL_OPS
from ..layers.attention import PagedAttentionMetadata
from ..layers.layernorm import RMSNorm
from ..layers.rotary_embedding import deinterleave
from .spec import ModelSpec

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the RMSNorm default, not rms_norm_eps


class MLAttention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, dtype=None, device=None, kernels: KernelBackend | None = None) -> None:
        super().__init__()
        mla = spec.mla
        h, heads = spec.hidden_size, spec.num_heads
        kernels = kernels or KernelBackend.for_device(device)
        kw = dict(dtype=dtype, device=device)
        self.num_heads, self.mla = heads, mla
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(h, heads * mla.qk_head_dim, bias=False, **kw)
        else:
            self.q_a_proj = nn.Linear(h, mla.q_lora_rank, bias=spec.qkv_bias, **kw)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS, kernels=kernels, **kw)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, heads * mla.qk_head_dim, bias=False, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(h, mla.latent_dim, bias=spec.qkv_bias, **kw)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS, kernels=kernels, **kw)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False, **kw)
        self.o_proj = nn.Linear(heads * mla.v_head_dim, h, bias=spec.o_bias, **kw)
        self.rope = kernels.op("rope")  # x [T, heads, D], cos/sin [T, D] -> x*cos + rotate_half(x)*sin
        self.decode_backend = kernels.mla_decode
        #: decode over the latent cache on the Triton backend (the torch backend loops over sequences)
        self.decode = KERNEL_OPS["mla_decode"][self.decode_backend] if kernels.name == "triton" else None

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, H, qk_head_dim] (nope dims, then RoPE dims)."""
        if self.mla.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.num_heads, self.mla.qk_head_dim)

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, R] and W_UV [H, v, R]: views of kv_b_proj.weight [H*(nope+v), R]."""
        m = self.mla
        w = self.kv_b_proj.weight.view(self.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        return w[:, :m.qk_nope_head_dim], w[:, m.qk_nope_head_dim:]

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],  # [T, rope] each
        kv_cache: tuple[torch.Tensor],  # (latent cache [NB, B, kv_lora_rank + rope],)
        meta: PagedAttentionMetadata,
    ) -> torch.Tensor:
        m, t = self.mla, x.shape[0]
        q_nope, q_rope = self._queries(x).split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)  # [T, H, *]
        c, k_rope = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)  # [T, R], [T, r]
        c = self.kv_a_layernorm(c)
        if m.rope_interleave:
            q_rope, k_rope = deinterleave(q_rope), deinterleave(k_rope)
        cos, sin = cos_sin
        q_rope = self.rope(q_rope, cos, sin)  # [T, H, r]
        k_rope = self.rope(k_rope.reshape(t, 1, m.qk_rope_head_dim), cos, sin).view(t, m.qk_rope_head_dim)
        w_uk, w_uv = self._absorbed()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, R]
        q = torch.cat((q_latent, q_rope), dim=-1)  # [T, H, R + r]
        latent = torch.cat((c, k_rope), dim=-1)  # [T, R + r]
        o = meta.attend_latent(q, latent, kv_cache[0], m.kv_lora_rank, m.softmax_scale, decode=self.decode)  # [T, H, R]
        o = torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, v]
        return self.o_proj(o.reshape(t, self.num_heads * m.v_head_dim))
