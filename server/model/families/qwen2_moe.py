"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): a shared expert behind a sigmoid gate, q/k/v bias,
softmax top-k router without renormalisation by default."""
from __future__ import annotations

from ..spec import ModelLoadError
from .base import MoEFamily
from .qwen3_moe import sparse_layers
from .registry import register_family


@register_family("Qwen2MoeForCausalLM")
class Qwen2MoeFamily(MoEFamily):
    model_type = "qwen2_moe"
    defaults = {  # transformers' Qwen2MoeConfig defaults
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 28, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
        "norm_topk_prob": False, "mlp_only_layers": None, "qkv_bias": True, "layer_types": None,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }

    def moe_layer_indices(self, c, num_layers):
        return sparse_layers(c, num_layers)

    def shared_expert_intermediate_size(self, c):
        return c.positive_int("shared_expert_intermediate_size")

    def qkv_bias(self, c):
        return bool(c.get("qkv_bias"))

    def o_bias(self, c):
        return False

    def sliding_windows(self, c, num_layers):
        use = bool(c.get("use_sliding_window"))
        window = c.get("sliding_window") if use else 0
        types = c.get("layer_types")
        if types is None:
            max_window = c.get("max_window_layers")
            types = ["sliding_attention" if (i + 1) % 2 and i < max_window and use else "full_attention"
                     for i in range(num_layers)]
        if len(types) != num_layers:
            raise ModelLoadError(f"layer_types has {len(types)} entries for {num_layers} layers")
        return tuple(window if t == "sliding_attention" else None for t in types)
