"""DeepSeek-V3 / R1 and Kimi-K2 (DeepseekV3ForCausalLM): multi-head latent attention, a
group-limited sigmoid router with a selection-only correction bias, always-on shared experts,
and dense MLP layers for the first `first_k_dense_replace` layers.

Checkpoint names are transformers' (self_attn.q_a_proj / q_b_proj or q_proj, kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj; mlp.gate.weight + mlp.gate.e_score_correction_bias; mlp.shared_experts).
Multi-token-prediction layers (model.layers.{num_hidden_layers}.*) are not served and are skipped.
"""
from __future__ import annotations

from typing import Any

from ...layers.rotary_embedding import yarn_mscale
from ..spec import MLAShape, ModelLoadError
from .base import ConfigReader, MoEFamily
from .registry import register_family


@register_family("DeepseekV3ForCausalLM")
class DeepseekV3Family(MoEFamily):
    model_type = "deepseek_v3"
    defaults = {  # transformers' DeepseekV3Config defaults
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu",
        "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "pad_token_id": None,
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "rope_interleave": True,
        "attention_bias": False,
    }

    def num_experts(self, c: ConfigReader) -> int:
        return c.positive_int("n_routed_experts", "num_local_experts")

    def moe_layer_indices(self, c: ConfigReader, num_layers: int) -> tuple[int, ...]:
        first = c.get("first_k_dense_replace")
        if not isinstance(first, int) or first < 0:
            raise ModelLoadError(f"{c.source}: first_k_dense_replace must be an integer >= 0, got {first!r}")
        return tuple(range(first, num_layers))

    def shared_expert_intermediate_size(self, c: ConfigReader) -> int:
        shared = c.get("n_shared_experts")
        if not isinstance(shared, int) or shared < 0:
            raise ModelLoadError(f"{c.source}: n_shared_experts must be an integer >= 0, got {shared!r}")
        return c.positive_int("moe_intermediate_size") * shared

    def head_dim(self, c: ConfigReader, hidden: int, heads: int) -> int:
        return c.positive_int("qk_rope_head_dim")  # transformers sets config.head_dim to it: RoPE's width

    def extra_fields(self, c: ConfigReader, spec: dict[str, Any]) -> dict[str, Any]:
        num_experts, top_k = spec["num_experts"], spec["top_k"]
        groups, top_groups = c.positive_int("n_group"), c.positive_int("topk_group")
        if num_experts % groups or num_experts // groups < 2:
            raise ModelLoadError(f"{c.source}: n_group={groups} must split the {num_experts} experts into equal "
                                 "groups of at least 2 (groups are ranked by their two best scores)")
        if top_groups > groups:
            raise ModelLoadError(f"{c.source}: topk_group={top_groups} exceeds n_group={groups}")
        if top_k > top_groups * (num_experts // groups):
            raise ModelLoadError(f"{c.source}: num_experts_per_tok={top_k} exceeds the {top_groups * (num_experts // groups)} "
                                 f"experts of the topk_group={top_groups} groups a token may use")
        if spec["num_kv_heads"] != spec["num_heads"]:  # transformers' eager MLA repeats no kv heads
            raise ModelLoadError(f"{c.source}: num_key_value_heads={spec['num_kv_heads']} must equal "
                                 f"num_attention_heads={spec['num_heads']} for multi-head latent attention")
        return {
            "router_rule": "sigmoid_group_topk",
            "router_groups": groups,
            "router_topk_groups": top_groups,
            "routed_scaling_factor": float(c.get("routed_scaling_factor")),
            "shared_expert_gated": False,
            "mla": self._mla(c, spec),
        }

    def _mla(self, c: ConfigReader, spec: dict[str, Any]) -> MLAShape:
        q_lora = c.get("q_lora_rank")
        if q_lora is not None and (not isinstance(q_lora, int) or isinstance(q_lora, bool) or q_lora <= 0):
            raise ModelLoadError(f"{c.source}: q_lora_rank must be a positive integer or null, got {q_lora!r}")
        nope, rope = c.positive_int("qk_nope_head_dim"), c.positive_int("qk_rope_head_dim")
        if rope % 2:
            raise ModelLoadError(f"{c.source}: qk_rope_head_dim={rope} must be even (RoPE rotates pairs)")
        v_dim = c.positive_int("v_head_dim")
        return MLAShape(q_lora_rank=q_lora, kv_lora_rank=c.positive_int("kv_lora_rank"), qk_nope_head_dim=nope,
                        qk_rope_head_dim=rope, v_head_dim=v_dim, rope_interleave=bool(c.get("rope_interleave")),
                        softmax_scale=self._softmax_scale(c, nope + rope))

    def _softmax_scale(self, c: ConfigReader, qk_head_dim: int) -> float:
        """transformers' yarn_apply_mscale: qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim)**2
        when the rope type is not "default" and mscale_all_dim is set."""
        scale = qk_head_dim ** -0.5
        params = self.rope_parameters(c, c.source)
        if self.rope_type(c, c.source) != "default" and params.get("mscale_all_dim"):
            factor = params.get("factor")
            if factor is None:
                raise ModelLoadError(f"{c.source}: rope parameters with mscale_all_dim need a factor")
            m = yarn_mscale(float(factor), float(params["mscale_all_dim"]))
            scale = scale * m * m
        return scale
