"""Mixtral: every layer MoE, softmax over all experts then top-k renormalised (equivalently,
softmax over the top-k logits), router weights kept in float32, optional sliding window.
Checkpoints name the block `block_sparse_moe` and the expert projections w1 (gate), w3 (up),
w2 (down)."""
from __future__ import annotations

from .base import MoEFamily
from .registry import register_family


@register_family("MixtralForCausalLM")
class MixtralFamily(MoEFamily):
    model_type = "mixtral"
    default_rope_theta = 1e6
    moe_module_names = ("block_sparse_moe", "mlp")
    expert_proj_names = ("w1", "w3", "w2")
    router_float32_weights = True
    defaults = {  # transformers' MixtralConfig defaults
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "max_position_embeddings": 4096 * 32, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
        "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "sliding_window": None, "num_experts_per_tok": 2, "num_local_experts": 8,
    }

    def moe_intermediate_size(self, c):
        return c.positive_int("intermediate_size")

    def norm_topk_prob(self, c):
        return True

    def qkv_bias(self, c):
        return False

    def o_bias(self, c):
        return False

    def sliding_windows(self, c, num_layers):
        return (c.get("sliding_window"),) * num_layers
