"""The engine on GPUs (run on the GPU machine): greedy generations equal transformers' on
the same GPU at ep 1 (and ep 2 over NCCL with two GPUs), many concurrent requests all
finish and free their blocks, a dead rank under NCCL fails requests fast."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.engine.api import EngineUnavailableError
from server.frontend.start import start_engine
from tests.engine.test_engine_generate import MAX_NEW, PROMPTS, build_model_folder, make_app, request, serve_all

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def two_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def _folder_and_greedy(folder, **overrides):
    """A random Qwen3-MoE folder and transformers' greedy generations of PROMPTS on this GPU."""
    model = build_model_folder(folder, seed=3, **overrides).cuda()
    expected = []
    with torch.no_grad():
        for p in PROMPTS:
            out = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=MAX_NEW, do_sample=False)
            expected.append(out[0, len(p):].tolist())
    return folder, expected


@pytest.fixture(scope="module")
def qwen3_gpu(tmp_path_factory):
    return _folder_and_greedy(tmp_path_factory.mktemp("qwen3_moe_gpu"))


@pytest.fixture(scope="module")
def qwen3_gpu_graphable(tmp_path_factory):
    """head_dim 16: the Triton attention kernels (tl.dot needs >= 16) run it, so decode can be
    captured; the default test model's head_dim 8 keeps decode eager."""
    return _folder_and_greedy(tmp_path_factory.mktemp("qwen3_moe_gpu16"), head_dim=16)


@pytest.mark.parametrize("ep_size", [1, pytest.param(2, marks=pytest.mark.skipif(not two_gpus(), reason="needs 2 GPUs"))])
def test_gpu_greedy_matches_transformers(qwen3_gpu, ep_size) -> None:
    folder, expected = qwen3_gpu
    eng = start_engine(make_app(folder, ep_size=ep_size), in_thread=True)
    try:
        assert eng.model_info().device == "cuda:0"
        results = serve_all(eng, [request(i, p) for i, p in enumerate(PROMPTS)])
        assert [r[0] for r in results] == expected
        many = serve_all(eng, [request(i, PROMPTS[i % len(PROMPTS)], max_new=20, temperature=0.8,
                                       sampling={"seed": i}) for i in range(64)], stagger=0.0)
        assert all(len(r[0]) == 20 for r in many)
        stats = eng.stats()
        assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("ep_size", [1, pytest.param(2, marks=pytest.mark.skipif(not two_gpus(), reason="needs 2 GPUs"))])
def test_gpu_ep_decode_replays_graphs_with_the_collectives_inside(qwen3_gpu_graphable, ep_size, monkeypatch) -> None:
    """parallel.dispatch=allgather (at ep 1: the forced EP path over a size-1 NCCL group): every
    rank captures decode graphs holding the all-gather / all-to-all, the engine replays them in
    lockstep, and greedy generations still equal transformers'."""
    from dataclasses import replace

    from server.model.gpu.cuda_graphs import DecodeGraphRunner

    for key, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        monkeypatch.setenv(key, value)
    replays = []
    original = DecodeGraphRunner.replay

    def counting(self, num_seqs, bucket=None):
        replays.append((num_seqs, bucket))
        return original(self, num_seqs, bucket)

    monkeypatch.setattr(DecodeGraphRunner, "replay", counting)  # rank 0 (this process)
    folder, expected = qwen3_gpu_graphable
    app = make_app(folder, ep_size=ep_size)
    eng = start_engine(replace(app, parallel=replace(app.parallel, dispatch="allgather")), in_thread=True)
    try:
        graphs = eng.core.executor.runner.decode_graphs
        assert graphs is not None and graphs.lockstep and graphs.capture_enabled
        results = serve_all(eng, [request(i, p) for i, p in enumerate(PROMPTS)])
        assert [r[0] for r in results] == expected
        assert replays and all(bucket is not None for _, bucket in replays)
    finally:
        eng.shutdown()


def test_gpu_policy_switch_right_after_a_prefill_recaptures_and_still_matches(qwen3_gpu_graphable) -> None:
    """A switch re-captures the decode graphs over the engine's step buffers. When the step
    before it was a prefill (max_new_tokens=1: the request's only step), those buffers still
    hold its logits indices, row ends of a 13-token prompt past the largest bucket (3); the
    capture must not read them (it once did: a device-side assert that killed the engine)."""
    folder, expected = qwen3_gpu_graphable
    eng = start_engine(make_app(folder), in_thread=True)
    try:
        assert eng.core.executor.runner.decode_graphs is not None
        for policy in ("greedy_balanced", "natural"):
            assert len(serve_all(eng, [request(0, PROMPTS[2], max_new=1)])[0][0]) == 1
            asyncio.run(eng.set_routing_policy({"name": policy}))
        assert eng.core.executor.runner.decode_graphs is not None
        results = serve_all(eng, [request(i, p) for i, p in enumerate(PROMPTS)])
        assert [r[0] for r in results] == expected
    finally:
        eng.shutdown()


@pytest.mark.skipif(not two_gpus(), reason="needs 2 GPUs")
def test_gpu_dead_rank_fails_fast(qwen3_gpu) -> None:
    folder, _ = qwen3_gpu
    from dataclasses import replace

    app = make_app(folder, ep_size=2)
    eng = start_engine(replace(app, model=replace(app.model, max_model_len=256)), in_thread=True)
    try:
        async def main():
            gen = eng.generate(request(0, PROMPTS[2], max_new=200))
            await gen.__anext__()
            eng.core.executor.procs[0].kill()
            start = time.monotonic()
            with pytest.raises(EngineUnavailableError):
                async for _ in gen:
                    pass
            return time.monotonic() - start

        assert asyncio.run(main()) < 5.0
        assert eng.failure is not None
    finally:
        eng.shutdown(timeout=10)
