"""Tiny random transformers models of every supported family, saved in HF format (the oracle).

Shapes are tiny (CPU CI on shared cores) but cover each family's features: Qwen3 with a
dense layer (mlp_only_layers) and renormalised top-k, Qwen2 with the shared expert and
decoder_sparse_step, Mixtral with a sliding window, OLMoE with clip_qkv and its full q/k norm,
DeepSeek-V3 twice: q LoRA, interleaved YaRN RoPE with mscale, a dense first layer, 4 groups of
2 experts (whole groups per rank at ep 2/4); and a plain q projection, rotate-half YaRN RoPE
with an attention factor, no dense layer, 3 groups of 4 experts (groups straddle ranks at ep
2/4), two shared experts, no renormalisation. Their router correction bias is random (it is
zero at init), so selection-only biasing is exercised.
"""
from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)

FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(COMMON, num_hidden_layers=3, head_dim=8, intermediate_size=40,
                                          moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                          norm_topk_prob=True, mlp_only_layers=[1], rope_theta=10000.0)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(COMMON, num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                          decoder_sparse_step=2, norm_topk_prob=False)),
    "mixtral": ("MixtralConfig", dict(COMMON, num_hidden_layers=2, intermediate_size=16, num_local_experts=8,
                                       num_experts_per_tok=2, sliding_window=6)),
    "olmoe": ("OlmoeConfig", dict(COMMON, num_hidden_layers=2, intermediate_size=16, num_experts=8,
                                   num_experts_per_tok=2, norm_topk_prob=True, clip_qkv=3.0,
                                   pad_token_id=0, eos_token_id=1)),
}
_DEEPSEEK = dict(COMMON, num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=16, kv_lora_rank=16,
                 qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)
FAMILY_CONFIGS.update({
    "deepseek_v3": ("DeepseekV3Config", dict(
        _DEEPSEEK, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=24, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, rope_interleave=True,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})),
    "deepseek_v3_qproj": ("DeepseekV3Config", dict(
        _DEEPSEEK, num_hidden_layers=2, first_k_dense_replace=0, q_lora_rank=None, n_routed_experts=12,
        num_experts_per_tok=3, n_group=3, topk_group=2, n_shared_experts=2, routed_scaling_factor=1.5,
        norm_topk_prob=False, rope_interleave=False,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32})),
})
FAMILIES = list(FAMILY_CONFIGS)


def hf_config(family: str, **overrides):
    import transformers

    cls_name, kwargs = FAMILY_CONFIGS[family]
    return getattr(transformers, cls_name)(**{**kwargs, **overrides})


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of `family` (eager attention and experts: the plainest oracle)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        for layer in model.model.layers:
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0.0, 0.2)
    return model.eval()


def save_hf_model(model, folder: Path, **save_kwargs) -> Path:
    model.save_pretrained(folder, **save_kwargs)
    return folder


@torch.no_grad()
def hf_sequence_logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] float32 logits of a plain full-sequence forward."""
    return model(torch.tensor([tokens])).logits[0].float()


def save_fused_layout(model, folder: Path) -> Path:
    """Write the checkpoint with transformers' in-memory (fused) expert tensors:
    mlp.experts.gate_up_proj [E, 2I, H] and mlp.experts.down_proj [E, H, I] per layer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
