"""Front door for the model: one function per op, Triton on CUDA, the torch twin elsewhere.

    fused_moe(hidden [T,H], w13 [E,2I,H], w2 [E,H,I], topk_ids [T,k], topk_weights [T,k]) -> [T,H]
    grouped_expert_mlp(x_sorted [M,H], expert_offsets [E+1], w13, w2) -> [M,H]
    expert_mlp_rows(x [R,H], local_ids [R], w13, w2) -> [R,H]   (EP rows in any order)
    paged_decode_attention(q [S,Hq,D], k_cache, v_cache, block_tables [S,B], context_lens [S]) -> [S,Hq,D]
    prefill_attention(q [T,Hq,D], k_cache, v_cache, block_tables, cu_seqlens_q [S+1], context_lens [S]) -> [T,Hq,D]
    write_kv_cache(k [T,Hkv,D], v, k_cache, v_cache, slot_mapping [T]) -> None (in place)
    rms_norm(x [...,D], weight [D], eps) -> [...,D]          (transformers' RMSNorm, one pass)
    rope(x [T,heads,D], cos [T,D], sin [T,D]) -> [T,heads,D]  (rotary embedding, one pass)

`backend="auto"` picks "triton" for CUDA tensors when Triton imports, else "torch"; the env
var EPSERVE_KERNEL_BACKEND=torch forces the twins everywhere (baselines). The MoE ops also
accept "grouped_mm" (torch._grouped_mm, CUDA sm90 / recent CPU builds). Each table below is
the registry of implementations for one op; Triton modules are imported on first use, so a
CPU install without triton never imports it.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from .availability import resolve_backend

_PKG = __name__.rsplit(".", 1)[0]

# op -> backend -> (module, function)
_IMPLS: dict[str, dict[str, tuple[str, str]]] = {
    "fused_moe": {
        "triton": ("fused_moe", "fused_moe_triton"),
        "torch": ("moe_reference", "moe_reference"),
        "grouped_mm": ("moe_reference", "moe_grouped_mm"),
    },
    "grouped_expert_mlp": {
        "triton": ("fused_moe", "grouped_expert_mlp_triton"),
        "torch": ("moe_reference", "grouped_expert_mlp_reference"),
        "grouped_mm": ("moe_reference", "grouped_expert_mlp_grouped_mm"),
    },
    "expert_mlp_rows": {
        "triton": ("fused_moe", "expert_mlp_rows_triton"),
        "torch": ("moe_reference", "expert_mlp_rows_reference"),
    },
    "paged_decode_attention": {
        "triton": ("attention_decode", "paged_decode_attention_triton"),
        "torch": ("attention_reference", "paged_decode_attention_reference"),
    },
    "prefill_attention": {
        "triton": ("attention_prefill", "prefill_attention_triton"),
        "torch": ("attention_reference", "prefill_attention_reference"),
    },
    "write_kv_cache": {
        "triton": ("attention_decode", "write_kv_cache_triton"),
        "torch": ("attention_reference", "write_kv_cache"),
    },
    "rms_norm": {
        "triton": ("norm_rope", "rms_norm_triton"),
        "torch": ("norm_rope", "rms_norm_reference"),
    },
    "rope": {
        "triton": ("norm_rope", "rope_triton"),
        "torch": ("norm_rope", "rope_reference"),
    },
}


def implementation(op: str, backend: str, like: torch.Tensor) -> Callable:
    """The function implementing `op` for `backend` ('auto' resolved against tensor `like`)."""
    name = resolve_backend(backend, like)
    table = _IMPLS[op]
    if name not in table:
        raise ValueError(f"unknown backend {name!r} for {op}; available: {sorted(table)} or 'auto'")
    module, fn = table[name]
    return getattr(importlib.import_module(f"{_PKG}.{module}"), fn)


def fused_moe(hidden, w13, w2, topk_ids, topk_weights, *, backend: str = "auto") -> torch.Tensor:
    """[T, H]: sum over each token's valid slots (local id >= 0) of weight * expert MLP."""
    return implementation("fused_moe", backend, hidden)(hidden, w13, w2, topk_ids, topk_weights)


def grouped_expert_mlp(x_sorted, expert_offsets, w13, w2, *, backend: str = "auto") -> torch.Tensor:
    """[M, H]: expert e's MLP on rows offsets[e]:offsets[e+1] (EP path, no routing weight)."""
    return implementation("grouped_expert_mlp", backend, x_sorted)(x_sorted, expert_offsets, w13, w2)


def expert_mlp_rows(x, local_ids, w13, w2, *, backend: str = "auto") -> torch.Tensor:
    """[R, H]: row r through local expert local_ids[r]; rows may come in any order (no argsort needed)."""
    return implementation("expert_mlp_rows", backend, x)(x, local_ids, w13, w2)


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


def rms_norm(x, weight, eps: float, *, backend: str = "auto") -> torch.Tensor:
    """[..., D]: x normalised in float32, cast to x's dtype, times weight."""
    return implementation("rms_norm", backend, x)(x, weight, eps)


def rope(x, cos, sin, *, backend: str = "auto") -> torch.Tensor:
    """[T, heads, D]: x * cos + rotate_half(x) * sin."""
    return implementation("rope", backend, x)(x, cos, sin)
