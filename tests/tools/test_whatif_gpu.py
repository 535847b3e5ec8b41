"""The EP what-if on a GPU (run on the GPU machine; skipped without CUDA): decode steps replay
CUDA graphs, the expert kernel agrees with the bare fused-MoE op on the same rows, and at
ep_size 1 the composed step time stays near the real engine's measured one in the same
process (the benchmark holds the 5% figure; a test allows noise on a small shape). Under
bench.expert_precision=fp8 (compute capability 8.9+) the experts run the engine's FP8 path and
agree with the bare FP8 op, with EPLB variants too."""
from __future__ import annotations

import pytest
import torch

from server.bench.settings import BenchSettings
from server.bench.whatif.document import run_whatif

pytestmark = pytest.mark.gpu

SHAPE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 4096, "hidden_size": 512,
         "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
         "head_dim": 64, "moe_intermediate_size": 256, "num_experts": 32, "num_experts_per_tok": 4,
         "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "rope_theta": 1e6,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def _settings(ep: int, **bench) -> BenchSettings:
    return BenchSettings.from_dict({
        "model": {"name": "whatif_gpu", "shape": SHAPE, "dtype": "bfloat16", "max_model_len": 512},
        "parallel": {"ep_size": ep},
        "bench": {"mode": "whatif", "batch": 32, "input_len": 64, "output_len": 16, "small_batch": 8, "sweep": [],
                  "workload": "lightllm", "routing_source": "trace", "whatif_reps": 5, **bench}})


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def test_whatif_at_ep1_tracks_the_real_engine():
    doc = run_whatif(_settings(1, whatif_validate=True, routing_source="model", repeats=3, policies=["natural"],
                               eplb_redundant_per_rank=[]))
    assert doc["decode_graphs"] and doc["dispatch"] == "local"
    for phase in ("prefill", "decode", "small_decode"):
        check = doc["validation"][phase]
        ratio = check["predicted_over_engine"]
        # the whole record in the message: its local/experts split says where a gap lies
        assert 0.75 < ratio < 1.33, f"{phase}: " + ", ".join(f"{k}={v}" for k, v in check.items() if k != "engine_runs_ms")


def test_whatif_at_ep4_kernels_agree_with_the_bare_op():
    doc = run_whatif(_settings(4))
    assert doc["decode_graphs"] and doc["dispatch"] == "allgather"
    assert doc["self_check"], "no self-check ran"
    for check in doc["self_check"]:
        assert 0.5 < check["standalone_ms"] / max(check["whatif_ms"], 1e-6) < 2.0, check
    decode = doc["phases"]["decode"]
    assert decode["round_robin_balanced"]["rank_max_over_mean"] < decode["natural"]["rank_max_over_mean"]
    assert all(s["breakdown_ms"]["experts"] > 0 and s["breakdown_ms"]["wire"] > 0 for s in decode.values())


def test_whatif_fp8_experts_run_the_fp8_path_and_agree_with_the_bare_fp8_op():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 experts need compute capability 8.9+")
    doc = run_whatif(_settings(4, expert_precision="fp8", eplb_redundant_per_rank=[], whatif_decode_steps=2,
                               policies=["natural", "round_robin_balanced"]))
    assert doc["model"]["expert_precision"] == "fp8"
    assert doc["model"]["expert_weights"].startswith("fp8 (e4m3, 128x128 block scales")
    assert doc["self_check"], "no self-check ran"
    for check in doc["self_check"]:
        assert 0.5 < check["standalone_ms"] / max(check["whatif_ms"], 1e-6) < 2.0, check
    decode = doc["phases"]["decode"]
    assert list(decode) == ["natural", "round_robin_balanced"]
    assert all(s["breakdown_ms"]["experts"] > 0 for s in decode.values())


def test_whatif_fp8_experts_with_eplb_variants():
    """EPLB variants no longer refuse fp8: every rank's slots, redundant copies included, are FP8."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 experts need compute capability 8.9+")
    doc = run_whatif(_settings(4, expert_precision="fp8", eplb_redundant_per_rank=[1], whatif_decode_steps=2,
                               policies=["natural"]))
    assert doc["model"]["expert_weights"].startswith("fp8 (e4m3, 128x128 block scales")
    decode = doc["phases"]["decode"]
    assert list(decode) == ["natural", "natural+eplb4"]
    assert all(s["breakdown_ms"]["experts"] > 0 for s in decode.values())
