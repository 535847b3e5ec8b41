"""DeepSeek-V3 / Kimi-K2 config handling: the conf/model shapes, YaRN RoPE and the softmax mscale
exactly as transformers computes them, config errors that name the key, and checkpoints that
must not load (quantised configs or tensors); MTP layers are skipped without a warning."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from server.config import AppConfig, ModelConfig, thaw
from server.model.loader import load_model, read_model_spec, spec_from_config
from server.layers.rotary_embedding import RotaryEmbedding
from server.model.spec import ModelLoadError
from server.moe.routing import build_policy
from tests.helpers.hf_models import build_hf_model, save_hf_model

CONF = str(Path(__file__).resolve().parents[2] / "conf")
ARCH = {"architectures": ["DeepseekV3ForCausalLM"]}


def _app(*overrides: str) -> AppConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return AppConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))


def _hf_config(shape: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model("deepseek_v3", **{k: v for k, v in shape.items() if k != "model_type"})


def test_deepseek_v3_shape():
    spec = read_model_spec(_app("model=deepseek_v3").model)
    assert (spec.num_layers, spec.num_experts, spec.top_k, spec.router_groups, spec.router_topk_groups) == (61, 256, 8, 8, 4)
    assert spec.moe_layer_indices == tuple(range(3, 61)) and spec.shared_expert_intermediate_size == 2048
    assert (spec.mla.q_lora_rank, spec.mla.latent_dim, spec.mla.v_head_dim) == (1536, 576, 128)
    short = read_model_spec(_app("model=deepseek_v3", "model.shape.num_hidden_layers=4",
                                 "model.shape.first_k_dense_replace=1").model)
    assert short.moe_layer_indices == (1, 2, 3)


def test_kimi_k2_shape():
    spec = read_model_spec(_app("model=kimi_k2").model)
    assert (spec.num_experts, spec.router_groups, spec.router_topk_groups, spec.num_heads) == (384, 1, 1, 64)
    assert spec.moe_layer_indices == tuple(range(1, 61)) and spec.routed_scaling_factor == 2.827


@pytest.mark.parametrize("model", ["deepseek_v3", "kimi_k2"])
def test_shapes_mean_what_transformers_makes_of_them(model):
    """Same spec from the yaml and from transformers' fully expanded config; YaRN inverse frequencies,
    the cos/sin attention factor and the softmax scale equal transformers' own."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, yarn_apply_mscale

    shape = thaw(_app(f"model={model}").model.shape)
    hf_cfg = _hf_config(shape)
    expanded = {**hf_cfg.to_dict(), **ARCH, "dtype": "bfloat16"}
    assert spec_from_config(shape, dtype="bfloat16") == spec_from_config(expanded, dtype="bfloat16")
    spec = spec_from_config(shape)
    ours = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_type, spec.rope_factor, yarn=spec.rope_yarn)
    theirs = DeepseekV3RotaryEmbedding(hf_cfg)
    assert spec.rope_type == "yarn"
    assert torch.equal(ours.inv_freq, theirs.inv_freq) and ours.attention_scaling == theirs.attention_scaling
    assert spec.mla.softmax_scale == yarn_apply_mscale(hf_cfg.rope_parameters, hf_cfg.qk_head_dim ** -0.5)
    positions = torch.tensor([0, 1, 17, 4095, 100000])
    cos, sin = ours.cos_sin(positions, torch.float32)
    want_cos, want_sin = theirs(torch.zeros(1, dtype=torch.float32), positions[None])
    assert torch.equal(cos, want_cos[0]) and torch.equal(sin, want_sin[0])


@pytest.mark.parametrize("overrides,match", [
    ({"n_routed_experts": 12, "n_group": 8}, "n_group=8 must split the 12 experts"),
    ({"n_routed_experts": 8, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 2}, "groups of at least 2"),
    ({"n_group": 4, "topk_group": 5}, "topk_group=5 exceeds n_group=4"),
    ({"n_routed_experts": 16, "n_group": 8, "topk_group": 2, "num_experts_per_tok": 5}, "num_experts_per_tok=5 exceeds the 4"),
    ({"num_key_value_heads": 8}, "num_key_value_heads=8 must equal num_attention_heads=128"),
    ({"first_k_dense_replace": 61}, "no decoder layer is an MoE layer"),
    ({"q_lora_rank": 0}, "q_lora_rank must be a positive integer or null"),
])
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(ModelLoadError, match=match):
        spec_from_config({**ARCH, **overrides})


def test_fp8_block_quantised_config_is_refused_under_quantization_none():
    quant = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ModelLoadError, match=r"FP8 block-quantised \(weight_block_size=\[128, 128\]\).*bf16/fp16/fp32"):
        spec_from_config({**ARCH, "quantization_config": quant}, quantization="none")
    assert spec_from_config({**ARCH, "quantization_config": quant}).quantization.block == (128, 128)  # auto reads it
    with pytest.raises(ModelLoadError, match="quant_method='awq'"):  # any other quantisation too, any family
        spec_from_config({"architectures": ["Qwen3MoeForCausalLM"], "quantization_config": {"quant_method": "awq"}})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_hf_model(build_hf_model("deepseek_v3", seed=7), tmp_path_factory.mktemp("ds"))


def _edit(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _load(path: Path):
    return load_model(ModelConfig(path=str(path)), policy=build_policy("natural"))


def test_fp8_tensors_without_a_quantization_config_are_refused(folder, tmp_path):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    bad = _edit(folder, tmp_path / "fp8", lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    assert "quantization_config" not in json.loads((bad / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=f"tensor '{name}'.*stored as F8_E4M3"):
        _load(bad)


def test_multi_token_prediction_layers_are_skipped_quietly(folder, tmp_path, caplog):
    extra = {"model.layers.3.eh_proj.weight": torch.zeros(32, 64), "model.layers.3.enorm.weight": torch.ones(32),
             "model.layers.0.mystery.weight": torch.zeros(2)}
    with_mtp = _edit(folder, tmp_path / "mtp", lambda t: t.update(extra))
    with caplog.at_level("INFO"):
        _load(with_mtp)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("model.layers.0.mystery.weight" in w for w in warnings)
    assert not any("eh_proj" in w or "enorm" in w for w in warnings)
    assert "skipping 2 tensor(s) of layers >= num_hidden_layers=3" in caplog.text
