"""Kernel front door: one function per op, Triton on CUDA, the torch twin elsewhere.

    paged_decode_attention(q [S,Hq,D], k_cache, v_cache, block_tables [S,B], context_lens [S]) -> [S,Hq,D]
    prefill_attention(q [T,Hq,D], k_cache, v_cache, block_tables, cu_seqlens_q [S+1], context_lens [S]) -> [T,Hq,D]
    write_kv_cache(k [T,Hkv,D], v, k_cache, v_cache, slot_mapping [T]) -> None (in place)
    write_latent_cache(latent [T,Dk], cache [NB,B,Dk], slot_mapping [T]) -> None (MLA, in place)
    mla_decode(q [S,H,Dk], cache, block_tables, context_lens, v_dim, scale) -> [S,H,v_dim]
    mla_prefill(q [T,H,Dk], cache, block_tables, cu_seqlens_q, context_lens, v_dim, scale) -> [T,H,v_dim]
    mla_prefill_expanded(q_nope [T,H,DN], q_rope [T,H,DR], k_nope [Lk,H,DN], k_rope [Lk,H|1,DR], v [Lk,H,DV],
                         cu_seqlens_q [S+1], cu_seqlens_k [S+1], scale) -> [T,H,DV]
    rms_norm(x [...,D], weight [D], eps) -> [...,D]          (transformers' RMSNorm, one pass)
    rope(x [T,heads,D], cos [T,D], sin [T,D]) -> [T,heads,D]  (rotary embedding, one pass)

The MoE ops (fused_moe, grouped_expert_mlp, expert_mlp_rows) register in the same table from
server/moe/kernels/ops.py. mla_decode also takes "triton_decode" (the decode-only head-block kernel
of mla_decode.py; models built for CUDA pick it, server/kernels/backend.py) and "dense" (batched
torch matmuls over the padded block tables: graph-safe, no kernel); its "triton" is the varlen
kernel of mla_attention.py run with one token per sequence. MLA prefill has two forms: mla_prefill
(absorbed queries over the latent cache, as decode) and mla_prefill_expanded (flash attention
over K/V decompressed through kv_b_proj, mla_prefill_expanded.py: fewer FLOPs for long prompts);
kernels.mla_prefill (absorbed | expanded | auto, mla_prefill_config.py) picks per step.
`backend="auto"` picks "triton" for CUDA tensors when Triton imports, else "torch"; the env var
EPSERVE_KERNEL_BACKEND=torch forces the twins everywhere (baselines). Each entry of KERNEL_OPS is
the registry of implementations for one op; Triton modules are imported on first use, so a CPU
install without triton never imports it.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..registry import Registry, UnknownNameError
from .availability import resolve_backend


class UnknownBackendError(UnknownNameError, ValueError):
    """An op asked for a backend it has no implementation for."""


#: op name -> its implementations: backend name -> "package.module:function" (imported on first use)
KERNEL_OPS: Registry[Registry[Callable]] = Registry("kernel op")


def register_op(op: str, **impls: str) -> Registry[Callable]:
    """Add an op with its implementations, e.g. register_op("rope", triton="pkg.mod:fn", torch=...)."""
    backends: Registry[Callable] = Registry(
        "backend", scope=op, lazy=True,
        error=lambda name, known: UnknownBackendError("backend", name, known, scope=op))
    for backend, target in impls.items():
        backends.register(backend, target)
    return KERNEL_OPS.register(op, backends)


register_op("paged_decode_attention",
            triton="server.kernels.attention_decode:paged_decode_attention_triton",
            torch="server.kernels.attention_reference:paged_decode_attention_reference")
register_op("prefill_attention",
            triton="server.kernels.attention_prefill:prefill_attention_triton",
            torch="server.kernels.attention_reference:prefill_attention_reference")
register_op("write_kv_cache",
            triton="server.kernels.attention_decode:write_kv_cache_triton",
            torch="server.kernels.attention_reference:write_kv_cache")
register_op("write_latent_cache",
            triton="server.kernels.mla_attention:write_latent_cache_triton",
            torch="server.kernels.mla_reference:write_latent_cache")
register_op("mla_decode",
            triton_decode="server.kernels.mla_decode:mla_decode_headblock_triton",
            triton="server.kernels.mla_attention:mla_decode_triton",
            torch="server.kernels.mla_reference:mla_decode_reference",
            dense="server.kernels.mla_reference:mla_decode_dense")
register_op("mla_prefill",
            triton="server.kernels.mla_attention:mla_prefill_triton",
            torch="server.kernels.mla_reference:mla_attention_reference")
register_op("mla_prefill_expanded",
            triton="server.kernels.mla_prefill_expanded:mla_prefill_expanded_triton",
            torch="server.kernels.mla_reference:mla_prefill_expanded_reference")
register_op("rms_norm",
            triton="server.kernels.norm_rope:rms_norm_triton",
            torch="server.kernels.norm_rope:rms_norm_reference")
register_op("rope",
            triton="server.kernels.norm_rope:rope_triton",
            torch="server.kernels.norm_rope:rope_reference")


def implementation(op: str, backend: str, like: torch.Tensor) -> Callable:
    """The function implementing `op` for `backend` ('auto' resolved against tensor `like`)."""
    return KERNEL_OPS[op][resolve_backend(backend, like)]


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float | None = None, *,
                           backend: str = "auto") -> torch.Tensor:
    return implementation("paged_decode_attention", backend, q)(q, k_cache, v_cache, block_tables, context_lens, scale)


def prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale: float | None = None, *,
                      max_query_len: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Varlen causal attention of new tokens over cache positions 0..ctx-1 (bottom-right causal)."""
    fn = implementation("prefill_attention", backend, q)
    if resolve_backend(backend, q) == "triton":
        return fn(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, max_query_len=max_query_len)
    return fn(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, backend: str = "auto") -> None:
    implementation("write_kv_cache", backend, k)(k, v, k_cache, v_cache, slot_mapping)


def write_latent_cache(latent, cache, slot_mapping, *, backend: str = "auto") -> None:
    implementation("write_latent_cache", backend, latent)(latent, cache, slot_mapping)


def mla_decode(q, cache, block_tables, context_lens, v_dim: int, scale: float, *, backend: str = "auto") -> torch.Tensor:
    """MLA over the latent cache, one new token per sequence (absorbed queries, mla_reference.py)."""
    return implementation("mla_decode", backend, q)(q, cache, block_tables, context_lens, v_dim, scale)


def mla_prefill(q, cache, block_tables, cu_seqlens_q, context_lens, v_dim: int, scale: float, *,
                max_query_len: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Varlen causal MLA of new tokens over the latent cache (bottom-right causal)."""
    fn = implementation("mla_prefill", backend, q)
    if resolve_backend(backend, q) == "triton":
        return fn(q, cache, block_tables, cu_seqlens_q, context_lens, v_dim, scale, max_query_len=max_query_len)
    return fn(q, cache, block_tables, cu_seqlens_q, context_lens, v_dim, scale)


def rms_norm(x, weight, eps: float, *, backend: str = "auto") -> torch.Tensor:
    """[..., D]: x normalised in float32, cast to x's dtype, times weight."""
    return implementation("rms_norm", backend, x)(x, weight, eps)


def rope(x, cos, sin, *, backend: str = "auto") -> torch.Tensor:
    """[T, heads, D]: x * cos + rotate_half(x) * sin."""
    return implementation("rope", backend, x)(x, cos, sin)
