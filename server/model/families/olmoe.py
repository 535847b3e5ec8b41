"""OLMoE: q/k RMSNorm over the whole projection (all heads at once, before the head split),
optional clip_qkv, every layer MoE, softmax top-k router with optional renormalisation."""
from __future__ import annotations

from .base import MoEFamily
from .registry import register_family


@register_family("OlmoeForCausalLM")
class OlmoeFamily(MoEFamily):
    model_type = "olmoe"
    qk_norm = "full"
    defaults = {  # transformers' OlmoeConfig defaults
        "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": None, "hidden_act": "silu",
        "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
        "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279, "tie_word_embeddings": False,
        "attention_bias": False, "clip_qkv": None, "num_experts_per_tok": 8, "num_experts": 64,
        "norm_topk_prob": False,
    }

    def moe_intermediate_size(self, c):
        return c.positive_int("intermediate_size")

    def clip_qkv(self, c):
        value = c.get("clip_qkv")
        return None if value is None else float(value)
