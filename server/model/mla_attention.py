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

Prefill of long prompts is compute-bound, and there the absorbed form wastes work: per (query,
key, head) it does 2 * (kv_lora_rank + rope) + 2 * kv_lora_rank FLOPs where the expanded form,
K = [W_UK c | k_rope] and V = W_UV c decompressed once per context row, does 2 * (nope + rope)
+ 2 * v (~3.4x fewer at DeepSeek-V3 widths). So on the Triton backend a prefill step picks one
of the two (kernels.mla_prefill, or EPSERVE_MLA_PREFILL: "absorbed", "expanded", "auto": expanded
once the step's new tokens per cached key reach EXPANDED_MIN_QUERIES_PER_KEY and its contexts
fit EXPANDED_MAX_KEYS, see
server/kernels/mla_prefill_config.py); the expanded form runs the metadata's
`attend_latent_expanded` with `_decompress` below. The torch backend's loop stays absorbed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.backend import KernelBackend
from ..kernels.mla_prefill_config import MLA_PREFILL_MODES
from ..kernels.ops import KERNEL_OPS
from ..layers.attention import PagedAttentionMetadata
from ..layers.layernorm import RMSNorm
from ..layers.rotary_embedding import deinterleave
from .spec import ModelSpec

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the RMSNorm default, not rms_norm_eps


class MLAttention(nn.Module):
    #: children whose weight this module reads itself (absorbed decode's W_UK / W_UV): an FP8
    #: checkpoint's copy of them is dequantised on load, not kept as e4m3 (server/model/fp8_dense.py)
    keeps_dense_values = ("kv_b_proj",)

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
        #: queries per key -> expanded prefill? (kernels.mla_prefill; None: always absorbed, the torch loop)
        self.prefill_expanded = MLA_PREFILL_MODES[kernels.mla_prefill] if kernels.name == "triton" else None

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

    def _decompress(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Context latent rows [Lk, R + r] -> k_nope [Lk, H, nope], k_rope [Lk, 1, r] (shared by the
        heads), v [Lk, H, v]: one matmul through kv_b_proj (views of its output, nothing copied)."""
        m = self.mla
        kv = self.kv_b_proj(rows[:, :m.kv_lora_rank]).view(rows.shape[0], self.num_heads, -1)  # [Lk, H, nope + v]
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        return k_nope, rows[:, None, m.kv_lora_rank:], v

    def _expanded(self, meta: PagedAttentionMetadata) -> bool:
        """Does this step run the expanded prefill? Decode steps and the torch loop never do."""
        qpk = meta.prefill_queries_per_key
        return (self.prefill_expanded is not None and qpk is not None
                and self.prefill_expanded(qpk, meta.prefill_keys))

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
        latent = torch.cat((c, k_rope), dim=-1)  # [T, R + r]
        if self._expanded(meta):
            o = meta.attend_latent_expanded(q_nope, q_rope, latent, kv_cache[0], self._decompress,
                                            m.softmax_scale)  # [T, H, v]
        else:
            w_uk, w_uv = self._absorbed()
            q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, R]
            q = torch.cat((q_latent, q_rope), dim=-1)  # [T, H, R + r]
            o = meta.attend_latent(q, latent, kv_cache[0], m.kv_lora_rank, m.softmax_scale,
                                   decode=self.decode)  # [T, H, R]
            o = torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, v]
        return self.o_proj(o.reshape(t, self.num_heads * m.v_head_dim))
