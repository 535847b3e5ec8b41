"""Overlapped scheduling on one GPU (run on the GPU machine: pytest -m gpu tests/engine/test_engine_overlap_gpu.py):

  * fp32, 32 concurrent requests (greedy and seeded sampling, mixed lengths), decode CUDA graphs
    on: the overlapped engine's tokens equal the one-step-at-a-time engine's;
  * launching a decode step (inputs staged, one copy, graph replay or eager forward, sampler,
    next-token scatter, the tokens' copy to the host) makes no host sync, with the previous
    step still unapplied: that is what lets the host run ahead of the GPU.
"""
from __future__ import annotations

import pytest
import torch

from server.config import AppConfig
from server.frontend.start import start_engine
from tests.engine.test_engine_generate import request, serve_all

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPTS = [list(b"Hello, world"), list(b"MoE"), list(b"The quick brown fox jumps"), [7], list(b"expert parallel!"),
           list(b"abc" * 9), list(b"serving"), list(b"z")]


def _app(overlap: bool) -> AppConfig:
    return AppConfig.from_dict({"model": {"name": "tiny", "dtype": "float32"},
                                "engine": {"max_num_seqs": 32, "kv_cache_tokens": 8192, "kv_block_size": 16,
                                           "overlap": overlap}})


def _requests():
    return [request(i, PROMPTS[i % len(PROMPTS)], max_new=8 + i % 9, temperature=0.0 if i % 2 else 0.9,
                    sampling={"seed": i, "top_k": 50}) for i in range(32)]


def test_overlap_equals_one_step_at_a_time_in_fp32() -> None:
    out = {}
    for overlap in (False, True):
        eng = start_engine(_app(overlap), in_thread=True)
        try:
            assert eng.core.executor.runner.decode_graphs is not None
            out[overlap] = [r[0] for r in serve_all(eng, _requests(), stagger=0.0)]
            stats = eng.stats()
            assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
        finally:
            eng.shutdown()
    assert [len(t) for t in out[True]] == [8 + i % 9 for i in range(32)]
    assert out[True] == out[False]


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_launching_a_decode_step_makes_no_host_sync(graphs, monkeypatch) -> None:
    from server.config import ModelConfig
    from server.engine.api import SamplingParams, StopParams, GenerationRequest
    from server.worker.model_runner import ModelRunner
    from server.core.scheduler import Scheduler
    from server.core.sequence import Sequence
    from server.model.loader import load_model
    from server.moe.routing import build_policy

    monkeypatch.setenv("EPSERVE_CUDA_GRAPHS", "1" if graphs else "0")
    model = load_model(ModelConfig(), policy=build_policy("natural"), device="cuda")
    runner = ModelRunner(model, rank=0, num_blocks=64, block_size=16, device="cuda", max_num_seqs=8, max_model_len=256,
                         max_num_batched_tokens=256)
    assert (runner.decode_graphs is not None) == graphs
    sch = Scheduler(num_ranks=1, num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=256, max_queue=8)
    for i, prompt in enumerate(PROMPTS[:5]):
        req = GenerationRequest(f"r{i}", tuple(prompt), SamplingParams(temperature=0.7 * (i % 2), seed=i),
                                StopParams(max_new_tokens=20))
        sch.add(Sequence.create(i, req, seed=i, max_total_len=len(prompt) + 20, now=0.0))
    previous = None
    for step in range(6):  # prefill, then decodes planned before the previous step is applied
        plan = sch.plan()
        torch.cuda.synchronize()
        if step >= 3:
            torch.cuda.set_sync_debug_mode("error")
        try:
            pending = runner.launch(plan.ranks[0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if previous is not None:
            sch.update(previous[0], [previous[1].result()])
        previous = (plan, pending)
    sch.update(previous[0], [previous[1].result()])
    assert all(seq.num_generated == 6 for seq in sch.running[0])
