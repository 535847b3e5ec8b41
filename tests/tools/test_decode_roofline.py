"""The decode step's memory roofline (server/bench/decode_roofline.py) on a random-weight model
drawn as an FP8 block checkpoint stores it: the bytes it counts, worked out here from the shape
(e4m3 codes of 1 byte, one fp32 scale per 128 x 128 block, bf16 elsewhere). The end-to-end
figures of a bench run: tests/tools/test_bench_cli.py."""
from __future__ import annotations

import math

import pytest
import torch

from server.bench.decode_roofline import (copy_rate_gb_s, dense_weight_bytes, expert_bytes_each, kv_bytes_per_token,
                                          mean_context, roofline_report)
from server.config import ModelConfig
from server.kernels.backend import KernelBackend
from server.layers.fp8_linear import Fp8Linear
from server.model.loader import load_model
from server.moe.routing import build_policy

H, I, E, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 128, 8, 2, 4, 2, 64, 512
SHAPE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": VOCAB, "hidden_size": H,
         "intermediate_size": 384, "moe_intermediate_size": I, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
         "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "num_experts": E, "num_experts_per_tok": 2,
         "max_position_embeddings": 256, "tie_word_embeddings": False}


def _blocks(rows: int, cols: int) -> int:
    return math.ceil(rows / 128) * math.ceil(cols / 128)


@pytest.fixture(scope="module")
def fp8_model():
    cfg = ModelConfig(name="roofline", shape=SHAPE, dtype="bfloat16", quantization="fp8")
    return load_model(cfg, policy=build_policy("natural"), device="cpu",
                      kernels=KernelBackend("torch", expert_weights="fp8"))


def test_dense_bytes_count_fp8_codes_and_scales_and_the_steps_embedding_rows(fp8_model) -> None:
    q, kv, o = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, HEADS * HEAD_DIM
    projections = [(q, H), (kv, H), (kv, H), (H, o)]  # q, k, v, o: FP8 in the checkpoint
    fp8 = LAYERS * sum(r * c + _blocks(r, c) * 4 for r, c in projections)
    norms = LAYERS * (2 * H + 2 * HEAD_DIM) + H  # input/post norms, q/k norms, final norm (bf16)
    router = LAYERS * E * H * 2  # the gate stays bf16
    head = VOCAB * H * 2  # lm_head stays bf16
    batch = 16
    assert sum(isinstance(m, Fp8Linear) for m in fp8_model.modules()) == LAYERS * len(projections)
    assert dense_weight_bytes(fp8_model, batch) == fp8 + norms * 2 + router + head + batch * H * 2


def test_expert_and_kv_bytes(fp8_model) -> None:
    codes = 3 * I * H  # gate, up, down: one byte each
    scales = (_blocks(2 * I, H) + _blocks(H, I)) * 4
    assert expert_bytes_each(fp8_model) == codes + scales
    cache = fp8_model.allocate_kv_cache(4, 16)
    assert kv_bytes_per_token(cache) == LAYERS * 2 * KV_HEADS * HEAD_DIM * 2


def test_report_from_measured_inputs() -> None:
    assert roofline_report(None, 8, 64, 63, 1.0) is None
    assert mean_context(64, 63) == 96.0 and mean_context(64, 0) == 64.0
    inputs = {"weight_bytes": 1e9, "expert_bytes_each": 1e6, "active_experts_per_step": 500.0,
              "kv_bytes_per_token": 1000, "copy_gb_s": 3000.0}
    r = roofline_report(inputs, 128, 64, 63, 0.6)
    assert r["bytes_per_step"] == pytest.approx(1e9 + 5e8 + 1000 * 128 * 96)
    assert r["roofline_ms"] == pytest.approx(r["bytes_per_step"] / 3e12 * 1e3)
    assert r["x_roofline"] == pytest.approx(r["roofline_ms"] / 0.6)


def test_copy_rate_is_measured() -> None:
    rate = copy_rate_gb_s(torch.device("cpu"), nbytes=8 << 20)
    assert math.isfinite(rate) and rate > 0.1
