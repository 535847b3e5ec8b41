"""config.json -> ModelSpec means what transformers makes of the same config.

Our families parse config.json themselves (no transformers import in rank processes), so
their defaults must equal transformers' config-class defaults: a config.json that omits keys
and the fully expanded config that transformers writes give the same spec.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from server.config import ModelConfig
from server.model.loader import load_model, spec_from_config
from server.model.spec import ModelLoadError
from server.moe.routing import build_policy
from tests.helpers.hf_models import build_hf_model, hf_sequence_logits, save_hf_model
from tests.helpers.paged_driver import PagedDriver

CASES = [
    ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", {}),
    ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", {"mlp_only_layers": [0, 5], "decoder_sparse_step": 2,
                                               "use_sliding_window": True, "num_hidden_layers": 8}),
    ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {}),
    ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {"use_sliding_window": True, "max_window_layers": 3,
                                               "sliding_window": 64, "num_hidden_layers": 6}),
    ("MixtralForCausalLM", "MixtralConfig", {}),
    ("MixtralForCausalLM", "MixtralConfig", {"sliding_window": 128, "head_dim": 64}),
    ("OlmoeForCausalLM", "OlmoeConfig", {}),
    ("OlmoeForCausalLM", "OlmoeConfig", {"clip_qkv": 8.0, "num_key_value_heads": 4, "norm_topk_prob": True}),
    ("DeepseekV3ForCausalLM", "DeepseekV3Config", {}),
    ("DeepseekV3ForCausalLM", "DeepseekV3Config", {"q_lora_rank": None, "n_group": 1, "topk_group": 1,
                                                   "first_k_dense_replace": 0, "rope_interleave": False,
                                                   "rope_scaling": {"type": "yarn", "factor": 8.0}}),
]


@pytest.mark.parametrize("arch,config_cls,overrides", CASES)
def test_defaults_match_transformers(arch, config_cls, overrides):
    minimal = {"architectures": [arch], **overrides}
    expanded = getattr(transformers, config_cls)(**overrides).to_dict()
    expanded["architectures"] = [arch]
    assert spec_from_config(minimal) == spec_from_config(expanded)


def test_layer_rules_follow_transformers():
    spec = spec_from_config({"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 8,
                             "mlp_only_layers": [0, 5], "decoder_sparse_step": 2})
    cfg = transformers.Qwen3MoeConfig(num_hidden_layers=8, mlp_only_layers=[0, 5], decoder_sparse_step=2)
    want = tuple(i for i in range(8) if i not in cfg.mlp_only_layers and (i + 1) % cfg.decoder_sparse_step == 0)
    assert spec.moe_layer_indices == want == (1, 3, 7)
    qwen2 = spec_from_config({"architectures": ["Qwen2MoeForCausalLM"], "num_hidden_layers": 6,
                              "use_sliding_window": True, "max_window_layers": 3, "sliding_window": 64})
    types = transformers.Qwen2MoeConfig(num_hidden_layers=6, use_sliding_window=True, max_window_layers=3).layer_types
    assert qwen2.sliding_windows == tuple(64 if t == "sliding_attention" else None for t in types)


def test_legacy_config_keys():
    """transformers 4.x checkpoints: top-level rope_theta, rope_scaling null, torch_dtype."""
    spec = spec_from_config({"architectures": ["MixtralForCausalLM"], "rope_theta": 5e5, "rope_scaling": None,
                             "torch_dtype": "bfloat16", "eos_token_id": 2}, extra_eos=(7, 2))
    assert (spec.rope_theta, spec.rope_type, spec.dtype, spec.eos_token_ids) == (5e5, "default", "bfloat16", (2, 7))
    linear = spec_from_config({"architectures": ["Qwen3MoeForCausalLM"], "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (linear.rope_type, linear.rope_factor) == ("linear", 2.0)


@pytest.mark.parametrize("bad,match", [
    ({"num_experts_per_tok": 9, "num_experts": 8}, "num_experts_per_tok=9 exceeds"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 must be a positive divisor"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"mlp_only_layers": [0, 1], "num_hidden_layers": 2}, "no decoder layer is an MoE layer"),
])
def test_bad_configs_name_the_key(bad, match):
    with pytest.raises(ModelLoadError, match=match):
        spec_from_config({"architectures": ["Qwen3MoeForCausalLM"], **bad})


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="checkpoint dtype 'float64' cannot be served"):
        spec_from_config({"architectures": ["Qwen3MoeForCausalLM"], "dtype": "float64"})


def test_linear_rope_matches_transformers(tmp_path):
    hf = build_hf_model("qwen3_moe", rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 500.0})
    model = load_model(ModelConfig(path=str(save_hf_model(hf, tmp_path))), policy=build_policy("natural"))
    assert (model.spec.rope_type, model.spec.rope_factor, model.spec.rope_theta) == ("linear", 3.0, 500.0)
    tokens = list(range(3, 60, 4))
    want = hf_sequence_logits(hf, tokens)[-1]
    got = PagedDriver(model).step([(0, tokens)])[0]
    assert (got - want).abs().max() < 1e-4
