"""model.shape: a random-weight model of any supported shape, no checkpoint (GPU benchmarks at
real sizes use this; here the shapes are tiny)."""
from __future__ import annotations

import pytest
import torch

from server.config import AppConfig, ModelConfig
from server.model.loader import load_model, load_tokenizer, read_model_spec
from server.model.spec import ModelLoadError
from server.moe.routing import build_policy
from tests.helpers.paged_driver import PagedDriver

SHAPE = {"architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48, "moe_intermediate_size": 16,
         "shared_expert_intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 2}


def _load(shape=SHAPE, **kw):
    cfg = ModelConfig(name="bench", shape=shape, dtype=kw.pop("dtype", "float32"), seed=kw.pop("seed", 0))
    return load_model(cfg, policy=build_policy("natural"), **kw)


def test_random_model_runs_and_is_seeded():
    a, b, c = _load(), _load(), _load(seed=1)
    for (name, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), name
        if "norm" not in name and not name.endswith(".bias"):
            assert not torch.equal(p, r), name
    logits = PagedDriver(a).step([(0, [1, 2, 3]), (1, [299, 0])])
    assert all(v.shape == (300,) and torch.isfinite(v).all() for v in logits.values())


def test_norms_are_one_and_biases_zero():
    model = _load()
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(32))
    assert torch.equal(layer.self_attn.q_proj.bias, torch.zeros(32))  # Qwen2: qkv bias
    assert layer.self_attn.q_proj.weight.std() > 0.01


@pytest.mark.parametrize("ep", [2, 4])
def test_experts_do_not_depend_on_ep_size(ep):
    full = _load()
    per = 8 // ep
    for rank in range(ep):
        part = _load(ep_rank=rank, ep_size=ep)
        assert part.expert_bytes_loaded * ep == full.expert_bytes_loaded
        for a, b in zip(part.model.layers, full.model.layers):
            assert torch.equal(a.mlp.experts.gate_up_proj, b.mlp.experts.gate_up_proj[rank * per:(rank + 1) * per])
            assert torch.equal(a.mlp.gate.weight, b.mlp.gate.weight)
            assert torch.equal(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight)


def test_shape_through_app_config_and_dtype_auto():
    app = AppConfig.from_dict({"model": {"name": "bench", "shape": SHAPE}})
    assert read_model_spec(app.model).dtype == "bfloat16"  # auto without a dtype in the shape
    assert read_model_spec(ModelConfig(shape={**SHAPE, "torch_dtype": "float32"})).dtype == "float32"
    model = load_model(app.model, policy=build_policy("natural"))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_shape_model_borrows_the_byte_tokenizer():
    tok = load_tokenizer(ModelConfig(shape=SHAPE))
    assert tok.encode("ok", add_special_tokens=False) == [111, 107]


def test_shape_with_unknown_architecture():
    with pytest.raises(ModelLoadError, match="unsupported architecture 'LlamaForCausalLM'"):
        read_model_spec(ModelConfig(shape={**SHAPE, "architectures": ["LlamaForCausalLM"]}))
