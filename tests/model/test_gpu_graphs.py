"""GPU path of the model on CUDA (run on the GPU machine: pytest -m gpu tests/model/test_gpu_graphs.py).

  * an eager decode step makes no host sync (torch.cuda.set_sync_debug_mode("error")), for every
    built-in policy: the ep_size 1 path is what the graphs capture;
  * decode through CUDA graphs is bitwise the eager step at a bucket size, and padded batches
    give the same greedy tokens and count no padding in the expert loads;
  * the Triton path (attention kernels + fused MoE) tracks the torch path at real widths.
The CPU interpreter twin of these checks is tests/kernels/test_gpu_path_interpreter.py.
"""
from __future__ import annotations

import pytest
import torch

from server.bench.workload import StaticWorkload
from server.config import ModelConfig
from server.model.gpu.cuda_graphs import DecodeGraphRunner
from server.model.loader import load_model
from server.moe.routing import build_policy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
QWEN3_2L = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 2,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "moe_intermediate_size": 768,
            "intermediate_size": 6144, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True}
POLICIES = ["natural", "greedy_balanced", "round_robin_balanced", "skewed", "uniform_random", "optimal_balanced",
            "rank_balanced"]
PAGE = 16


def _real(policy: str):
    return load_model(ModelConfig(name="qwen3-2l", shape=QWEN3_2L, dtype="bfloat16"), policy=build_policy(policy),
                      device="cuda")


def _tiny(policy: str):
    return load_model(ModelConfig(), policy=build_policy(policy), device="cuda")  # trained, fp32: clear margins


def _work(model, batch: int, input_len: int = 20, output_len: int = 8, seed: int = 0) -> StaticWorkload:
    return StaticWorkload.build(batch=batch, input_len=input_len, output_len=output_len, vocab_size=model.spec.vocab_size,
                                block_size=PAGE, device="cuda", seed=seed)


@pytest.mark.parametrize("policy", POLICIES)
def test_eager_decode_step_makes_no_host_sync(policy):
    model = _real(policy)
    work = _work(model, batch=16)
    kv = model.allocate_kv_cache(work.num_blocks, PAGE)
    steps = work.decode_batches()
    tok = model(work.prefill_batch(), kv).argmax(-1)
    tok = model(steps.batch(0, tok), kv).argmax(-1)  # warm-up: kernels compiled, policy tables on the device
    batch = steps.batch(1, tok)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = model(batch, kv)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (16, model.spec.vocab_size) and torch.isfinite(logits).all()


def _decode_both(model, work: StaticWorkload, max_batch: int, steps: int):
    """Greedy decode of `work` eagerly and through graphs (separate KV caches), each path feeding
    its own tokens. -> (eager logits, graph logits, eager loads, graph loads) per step."""
    kv_e = model.allocate_kv_cache(work.num_blocks, PAGE)
    kv_g = model.allocate_kv_cache(work.num_blocks, PAGE)
    runner = DecodeGraphRunner(model, kv_g, max_batch=max_batch, max_blocks_per_seq=work.block_tables.shape[1])
    decode = work.decode_batches()
    out = {}
    for name, kv, fn in (("eager", kv_e, lambda b: model(b, kv_e)), ("graph", kv_g, lambda b: runner.run(b).clone())):
        tok = model(work.prefill_batch(), kv).argmax(-1)
        model.load_counters.reset()
        logits = []
        for i in range(steps):
            step_logits = fn(decode.batch(i, tok))
            logits.append(step_logits)
            tok = step_logits.argmax(-1)
        out[name] = (logits, model.load_counters.snapshot(reset=True))
    return out["eager"][0], out["graph"][0], out["eager"][1], out["graph"][1]


@pytest.mark.parametrize("policy", ["natural", "greedy_balanced", "round_robin_balanced", "optimal_balanced", "rank_balanced"])
def test_graph_decode_is_bitwise_eager_at_a_bucket_size(policy):
    """8 sequences = the 8-bucket, same block-table width: the graph runs exactly the eager kernels."""
    model = _real(policy)
    eager, graph, load_e, load_g = _decode_both(model, _work(model, batch=8), max_batch=8, steps=6)
    for i, (a, b) in enumerate(zip(eager, graph)):
        assert torch.equal(a, b), f"step {i}: max |eager - graph| = {(a - b).abs().max().item():.3g}"
    assert load_e == load_g


@pytest.mark.parametrize("policy", ["natural", "round_robin_balanced"])
def test_padded_graph_decode_gives_the_same_greedy_tokens(policy):
    """5 sequences in the 8-bucket (3 padding rows): same greedy tokens; padding is not counted."""
    model = _tiny(policy)
    eager, graph, load_e, load_g = _decode_both(model, _work(model, batch=5), max_batch=8, steps=7)
    for i, (a, b) in enumerate(zip(eager, graph)):
        assert a.shape == b.shape == (5, model.spec.vocab_size)
        assert torch.equal(a.argmax(-1), b.argmax(-1)), f"step {i}: greedy tokens differ"
        assert (a - b).abs().max().item() < 1e-3
    assert load_g.tokens == [5 * 7] * model.spec.num_moe_layers  # real rows only
    if policy == "round_robin_balanced":  # ids do not depend on the numerics: loads match exactly
        assert load_e == load_g


def test_kernel_path_tracks_torch_path_at_real_width(monkeypatch):
    """Prefill + 2 decode steps, Triton kernels vs EPSERVE_KERNEL_BACKEND=torch (routing fixed by
    round_robin_balanced, so only the arithmetic differs): bf16-level agreement."""
    model = _real("round_robin_balanced")
    work = _work(model, batch=4, input_len=24, output_len=3)

    def run(model) -> list[torch.Tensor]:
        kv = model.allocate_kv_cache(work.num_blocks, PAGE)
        decode = work.decode_batches()
        out = [model(work.prefill_batch(), kv)]
        tok = torch.tensor([11, 22, 33, 44], device=work.device)  # same inputs on both paths
        for i in range(len(decode)):
            out.append(model(decode.batch(i, tok), kv))
        return out

    kernel = run(model)
    monkeypatch.setenv("EPSERVE_KERNEL_BACKEND", "torch")
    reference = run(_real("round_robin_balanced"))  # kernels are chosen when a model is built; same seeded weights
    for i, (a, b) in enumerate(zip(kernel, reference)):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 2e-2, f"step {i}: relative error {rel:.3g}"


def test_graph_capture_covers_every_bucket_and_replays_fast():
    model = _real("greedy_balanced")
    work = _work(model, batch=128, input_len=64, output_len=3)
    kv = model.allocate_kv_cache(work.num_blocks, PAGE)
    runner = DecodeGraphRunner(model, kv, max_batch=128, max_blocks_per_seq=work.block_tables.shape[1])
    assert runner.buckets == [1, 2, 4, 8, 16, 32, 64, 128]
    tok = model(work.prefill_batch(), kv).argmax(-1)
    batch = work.decode_batches().batch(0, tok)
    runner.run(batch)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        runner.run(batch)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 10
    # 2 layers of 128 experts (2.4 GB of expert weights) + a 151936-wide head: far below 20 ms on an H100
    assert 0 < ms < 20, ms


def test_engine_decodes_through_graphs_with_the_same_tokens(monkeypatch):
    """The serving engine (ModelRunner hook) captures decode graphs on CUDA at ep 1 and generates
    exactly what it generates with them off (EPSERVE_CUDA_GRAPHS=0)."""
    from server.config import AppConfig
    from server.frontend.start import start_engine
    from tests.engine.test_engine_generate import request, serve_all

    prompts = [list(b"Hello, world"), list(b"The quick brown fox"), list(b"MoE")]

    def generate(graphs: bool) -> list[list[int]]:
        monkeypatch.setenv("EPSERVE_CUDA_GRAPHS", "1" if graphs else "0")
        app = AppConfig.from_dict({"model": {"name": "tiny"},
                                   "engine": {"max_num_seqs": 4, "kv_cache_tokens": 2048, "kv_block_size": 16}})
        eng = start_engine(app, in_thread=True)
        try:
            runner = eng.core.executor.runner
            assert (runner.decode_graphs is not None) == graphs
            if graphs:
                assert runner.decode_graphs.buckets == [1, 2, 4]
            return [r[0] for r in serve_all(eng, [request(i, p, max_new=12) for i, p in enumerate(prompts)])]
        finally:
            eng.shutdown()

    with_graphs = generate(True)
    assert all(len(tokens) == 12 for tokens in with_graphs)
    assert with_graphs == generate(False)
