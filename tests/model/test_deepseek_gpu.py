"""DeepSeek-V3's GPU path on CUDA (pytest -m gpu tests/model/test_deepseek_gpu.py): MLA over the
latent cache with the real latent widths (kv_lora_rank 512 + rope 64), the grouped router, a
shared expert and a dense first layer, at reduced hidden/expert sizes so the test stays small.

  * an eager decode step makes no host sync (what the decode graphs capture);
  * decode through CUDA graphs is bitwise the eager step at a bucket size, with each MLA decode
    path (EPSERVE_MLA_DECODE: the head-block kernel, the varlen kernel, batched matmuls); padded
    buckets give the same greedy tokens and count no padding;
  * the Triton path tracks the torch path (a model built under EPSERVE_KERNEL_BACKEND=torch).
"""
from __future__ import annotations

import pytest
import torch

from server.config import ModelConfig
from server.model.loader import load_model
from server.moe.routing import build_policy
from tests.model.test_gpu_graphs import PAGE, _decode_both, _work

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEEPSEEK_2L = {
    "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 4096,
    "moe_intermediate_size": 512, "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 32,
    "num_key_value_heads": 32, "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "num_experts_per_tok": 6, "n_group": 8,
    "topk_group": 4, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0,
                     "mscale_all_dim": 1.0},
    "max_position_embeddings": 163840,
}


def _deepseek(policy: str, dtype: str = "bfloat16"):
    return load_model(ModelConfig(name="deepseek-2l", shape=DEEPSEEK_2L, dtype=dtype), policy=build_policy(policy),
                      device="cuda")


@pytest.mark.parametrize("policy", ["natural", "greedy_balanced"])
def test_eager_decode_step_makes_no_host_sync(policy):
    model = _deepseek(policy)
    work = _work(model, batch=16)
    kv = model.allocate_kv_cache(work.num_blocks, PAGE)
    steps = work.decode_batches()
    tok = model(work.prefill_batch(), kv).argmax(-1)
    tok = model(steps.batch(0, tok), kv).argmax(-1)  # warm-up: kernels compiled
    batch = steps.batch(1, tok)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = model(batch, kv)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (16, model.spec.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("decode", ["triton_decode", "triton", "dense"])
@pytest.mark.parametrize("policy", ["natural", "greedy_balanced"])
def test_graph_decode_is_bitwise_eager_at_a_bucket_size(policy, decode, monkeypatch):
    monkeypatch.setenv("EPSERVE_MLA_DECODE", decode)
    model = _deepseek(policy)
    assert all(layer.self_attn.decode_backend == decode and layer.self_attn.decode is not None
               for layer in model.model.layers)
    eager, graph, load_e, load_g = _decode_both(model, _work(model, batch=8), max_batch=8, steps=6)
    for i, (a, b) in enumerate(zip(eager, graph)):
        assert torch.equal(a, b), f"step {i}: max |eager - graph| = {(a - b).abs().max().item():.3g}"
    assert load_e == load_g


def test_padded_graph_decode_gives_the_same_greedy_tokens():
    """5 sequences in the 8-bucket: fp32 weights (clear argmax margins), padding not counted."""
    model = _deepseek("round_robin_balanced", dtype="float32")
    eager, graph, load_e, load_g = _decode_both(model, _work(model, batch=5), max_batch=8, steps=7)
    for i, (a, b) in enumerate(zip(eager, graph)):
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {i}: greedy tokens differ"
        assert (a - b).abs().max().item() < 1e-3
    assert load_g.tokens == [5 * 7] * model.spec.num_moe_layers and load_e == load_g


def test_kernel_path_tracks_torch_path(monkeypatch):
    """Prefill + 2 decode steps with routing fixed by round_robin_balanced: the Triton MLA kernels and
    fused MoE vs the torch twins (a second model built under EPSERVE_KERNEL_BACKEND=torch: kernels
    are chosen when a model is built; same seeded weights), bf16-level agreement."""
    model = _deepseek("round_robin_balanced")
    work = _work(model, batch=4, input_len=24, output_len=3)

    def run(model) -> list[torch.Tensor]:
        kv = model.allocate_kv_cache(work.num_blocks, PAGE)
        decode = work.decode_batches()
        out = [model(work.prefill_batch(), kv)]
        tok = torch.tensor([11, 22, 33, 44], device=work.device)
        for i in range(len(decode)):
            out.append(model(decode.batch(i, tok), kv))
        return out

    kernel = run(model)
    monkeypatch.setenv("EPSERVE_KERNEL_BACKEND", "torch")
    torch_model = _deepseek("round_robin_balanced")
    assert torch_model.attention_backend.name == "torch" and model.attention_backend.name == "triton"
    reference = run(torch_model)
    for i, (a, b) in enumerate(zip(kernel, reference)):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 2e-2, f"step {i}: relative error {rel:.3g}"
