"""Qwen3-MoE: per-head q/k RMSNorm, softmax top-k router with optional renormalisation, dense
layers where `mlp_only_layers` or `decoder_sparse_step` say so, optional sliding window."""
from __future__ import annotations

from .base import ConfigReader, MoEFamily
from .registry import register_family


def sparse_layers(c: ConfigReader, num_layers: int) -> tuple[int, ...]:
    """transformers' rule: MoE unless in mlp_only_layers, and (i + 1) % decoder_sparse_step == 0."""
    dense = set(c.get("mlp_only_layers") or [])
    step = c.get("decoder_sparse_step")
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


@register_family("Qwen3MoeForCausalLM")
class Qwen3MoeFamily(MoEFamily):
    model_type = "qwen3_moe"
    qk_norm = "per_head"
    defaults = {  # transformers' Qwen3MoeConfig defaults
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": 4096, "decoder_sparse_step": 1, "moe_intermediate_size": 768,
        "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False, "mlp_only_layers": None,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }

    def moe_layer_indices(self, c, num_layers):
        return sparse_layers(c, num_layers)

    def sliding_windows(self, c, num_layers):
        window = c.get("sliding_window") if c.get("use_sliding_window") else None
        return (window,) * num_layers
