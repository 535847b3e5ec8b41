"""EP rank orchestration: ep 4 over gloo, a rank dying mid-generation, torchrun launch,
and start-up checks that fail before anything is spawned."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from server.config import ConfigError
from server.engine.api import EngineUnavailableError
from server.worker.distributed import free_port
from server.frontend.start import start_engine
from tests.engine.test_engine_generate import MAX_NEW, PROMPTS, build_model_folder, hf_greedy, make_app, request, serve_all

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe_ranks")
    model = build_model_folder(folder, seed=2)
    expected = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS]
    return folder, model, expected


@pytest.mark.slow
def test_ep4_greedy_matches_transformers(qwen3) -> None:
    folder, _, expected = qwen3
    eng = start_engine(make_app(folder, ep_size=4, max_num_seqs=2), in_thread=True)
    try:
        results = serve_all(eng, [request(i, p) for i, p in enumerate(PROMPTS)])
        assert [r[0] for r in results] == expected
        snap = asyncio.run(eng.expert_load())
        assert snap.ep_size == 4 and snap.tokens[0] == sum(len(p) + MAX_NEW - 1 for p in PROMPTS)
    finally:
        eng.shutdown()


def test_forced_ep_dispatch_at_ep1_generates_like_transformers(qwen3) -> None:
    """parallel.dispatch=allgather at ep_size 1: the engine runs the fixed-capacity EP path over a
    size-1 gloo group (made for it, and gone after shutdown), with the same greedy tokens."""
    import torch.distributed as dist

    folder, _, expected = qwen3
    from dataclasses import replace

    app = make_app(folder, ep_size=1)
    app = replace(app, parallel=replace(app.parallel, dispatch="allgather"))
    eng = start_engine(app, in_thread=True)
    try:
        assert eng.core.executor.runner.model.dispatcher.name == "allgather"
        assert dist.is_initialized() and dist.get_world_size() == 1
        results = serve_all(eng, [request(i, p) for i, p in enumerate(PROMPTS)])
        assert [r[0] for r in results] == expected
    finally:
        eng.shutdown()
    assert not dist.is_initialized()


def test_a_dead_rank_fails_requests_quickly_and_marks_the_engine_dead(qwen3) -> None:
    folder, _, _ = qwen3
    app = make_app(folder, ep_size=2)
    from dataclasses import replace

    eng = start_engine(replace(app, model=replace(app.model, max_model_len=4096)), in_thread=True)
    failures = []
    eng.add_failure_callback(failures.append)
    try:
        async def main():
            gen = eng.generate(request(0, PROMPTS[2], max_new=4000))
            await gen.__anext__()
            eng.core.executor.procs[0].kill()
            start = time.monotonic()
            with pytest.raises(EngineUnavailableError, match="rank 1"):
                async for _ in gen:
                    pass
            return time.monotonic() - start

        took = asyncio.run(main())
        assert took < 5.0
        assert eng.wait_failed(5.0) and "rank 1" in eng.failure and failures == [eng.failure]
        assert not eng.is_alive
        with pytest.raises(EngineUnavailableError):
            serve_all(eng, [request(1, PROMPTS[0])])
    finally:
        eng.shutdown(timeout=10)
    assert multiprocessing.active_children() == []


def test_bad_parallel_settings_fail_before_spawning(qwen3) -> None:
    folder, _, _ = qwen3
    with pytest.raises(ConfigError, match="ep_size=3"):
        start_engine(make_app(folder, ep_size=3), in_thread=True)  # 8 experts
    assert multiprocessing.active_children() == []


TORCHRUN_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from server.config import AppConfig
    from server.core.startup import run_worker_rank, torchrun_rank
    from server.frontend.start import start_engine
    from server.engine.api import GenerationRequest, SamplingParams, StopParams

    app = AppConfig.from_dict({"model": {"name": "t", "path": sys.argv[1], "max_model_len": 64},
                               "engine": {"kv_cache_tokens": 256, "kv_block_size": 4}})
    if torchrun_rank() != 0:
        sys.exit(run_worker_rank(app))
    engine = start_engine(app, in_thread=True)

    async def main():
        req = GenerationRequest("t", tuple(int(t) for t in sys.argv[2].split(",")), SamplingParams(temperature=0.0),
                                StopParams(max_new_tokens=int(sys.argv[3]), ignore_eos=True))
        return [t async for c in engine.generate(req) for t in c.token_ids]

    tokens = asyncio.run(main())
    print("EP", engine.model_info().ep_size, "TOKENS", ",".join(map(str, tokens)), flush=True)
    engine.shutdown()
""")


@pytest.mark.slow
def test_torchrun_launch(qwen3, tmp_path) -> None:
    folder, _, expected = qwen3
    script = tmp_path / "serve_once.py"
    script.write_text(TORCHRUN_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port("127.0.0.1")), str(script), str(folder),
         ",".join(map(str, PROMPTS[1])), str(MAX_NEW)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("EP "))
    assert line == f"EP 2 TOKENS {','.join(map(str, expected[1]))}"


def test_spawned_ranks_get_the_same_config() -> None:
    """Worker processes rebuild the AppConfig from a plain dict (frozen mappings do not pickle)."""
    import pickle

    from server.config import AppConfig
    from server.config import app_to_dict

    app = AppConfig.from_dict({"routing": {"name": "skewed", "target": 3.0, "mode": "hot_ranks", "seed": 3},
                               "model": {"shape": {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64}},
                               "parallel": {"ep_size": 2}, "engine": {"max_queue": 7}})
    plain = pickle.loads(pickle.dumps(app_to_dict(app)))
    assert AppConfig.from_dict(plain) == app
