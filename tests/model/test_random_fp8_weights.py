"""model.quantization=fp8: a random-weight model.shape drawn as an FP8 block checkpoint stores its
weights, so a benchmark asks the balance question in the precision users deploy. Where the FP8
kernels run (forced here on CPU through KernelBackend(expert_weights="fp8"), as the engine picks
on a Hopper GPU) experts hold e4m3 codes and the dense linears an FP8 checkpoint quantises
become Fp8Linear layers, all from seeded streams; the embedding, head and router gate stay values.
Elsewhere (CPU by default) the same shape loads as values and serves. A checkpoint or the
embedded model refuses fp8, naming the key; so does the what-if where FP8 experts cannot run."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from server.bench.settings import BenchSettings
from server.config import ConfigError, ModelConfig
from server.kernels.backend import KernelBackend
from server.kernels.fp8_blocks import dequantize_blocks
from server.layers.fp8_linear import Fp8Linear
from server.model.loader import load_model, read_model_spec
from server.moe.routing import build_policy
from tests.helpers.paged_driver import PagedDriver

SHAPE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 256,
         "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 64, "moe_intermediate_size": 128, "num_experts": 8, "num_experts_per_tok": 2,
         "norm_topk_prob": True, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
         "tie_word_embeddings": False}


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"name": "shape", "shape": SHAPE, "dtype": "float32", "quantization": "fp8", **kw})


def test_fp8_is_for_random_weight_shapes_only():
    _cfg().validate()
    for bad in (_cfg(shape=None), _cfg(shape=None, path="/some/checkpoint")):
        with pytest.raises(ConfigError, match="model.quantization=fp8 draws random FP8 block weights"):
            bad.validate()
    assert read_model_spec(_cfg()).quantization.block == (128, 128)
    assert read_model_spec(_cfg(quantization="auto")).quantization is None


def test_random_fp8_weights_where_the_fp8_kernels_run():
    fp8 = KernelBackend("torch", expert_weights="fp8")
    models = [load_model(_cfg(), policy=build_policy("natural"), kernels=fp8) for _ in range(2)]
    a, b = models
    dense = {n: m for n, m in a.named_modules() if isinstance(m, Fp8Linear)}
    values = {n for n, m in a.named_modules() if type(m) is nn.Linear}
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"} <= set(dense)
    assert values == {"lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"}
    assert all(e.weight_format == "fp8" and e.gate_up_proj.dtype == torch.float8_e4m3fn for e in a.moe_experts())
    b_modules = dict(b.named_modules())
    for name, layer in dense.items():  # seeded: a second build draws the same codes and scales
        assert torch.equal(layer.weight_codes.view(torch.uint8), b_modules[name].weight_codes.view(torch.uint8))
        w = dequantize_blocks(layer.weight_codes, layer.weight_scale_inv, (128, 128))
        assert 0.015 < w.std().item() < 0.025, name  # N(0, initializer_range) through e4m3
    assert a.model.layers[0].self_attn.q_proj is not a.model.layers[1].self_attn.q_proj


def test_random_fp8_shape_serves_as_values_where_fp8_kernels_do_not_run():
    model = load_model(_cfg(), policy=build_policy("natural"))  # CPU: the engine's rule keeps values
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    assert all(e.weight_format == "values" for e in model.moe_experts())
    logits = PagedDriver(model, num_blocks=8, block_size=16).step([(0, [1, 2, 3])])[0]
    assert torch.isfinite(logits).all()


def test_whatif_refuses_fp8_where_the_engine_would_not_run_it():
    from server.bench.whatif.run import WhatIf

    settings = BenchSettings.from_dict({"model": {"name": "shape", "shape": SHAPE, "quantization": "fp8"},
                                        "bench": {"mode": "whatif", "batch": 4, "input_len": 4, "output_len": 2},
                                        "parallel": {"ep_size": 2, "device": "cpu"}})
    with pytest.raises(ConfigError, match=r"model.quantization=fp8: the engine would not run FP8 experts here"):
        WhatIf(settings)
