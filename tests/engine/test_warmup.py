"""The start-up warm-up (server/worker/warmup.py): it covers every fused-MoE variant a step can
select, leaves no trace a request could see (KV cache, blocks, expert-load counters), runs on
every EP rank at once, and engine.warmup=false turns it off."""
from __future__ import annotations

import pytest
import torch

from server.config import AppConfig, ConfigError
from server.core.step_io import EngineRequest
from server.core.startup import build_engine_core

pytest.importorskip("triton")

from server.moe.kernels.moe_align import align_variant  # noqa: E402
from server.moe.kernels.moe_config import CONFIG_DIR, _load_table, get_moe_config, nearest_bucket  # noqa: E402
from server.moe.kernels.variants import distinct_runs, rows_variant  # noqa: E402


def app(warmup: bool = False, ep_size: int = 1, **engine) -> AppConfig:
    return AppConfig.from_dict({"parallel": {"ep_size": ep_size},
                                "engine": {"max_num_seqs": 8, "kv_cache_tokens": 512, "kv_block_size": 4,
                                           "max_num_batched_tokens": 64, "max_queue": 64, "warmup": warmup, **engine}})


def brute_force(variant, n_max: int) -> set:
    return {variant(n) for n in range(1, n_max + 1)}


@pytest.mark.parametrize("shape", [(128, 2048, 768, torch.bfloat16), (16, 2048, 768, torch.bfloat16),
                                   (8, 64, 32, torch.float32)])
def test_distinct_runs_find_every_config_and_alignment_variant(shape) -> None:
    experts, hidden, inter, dtype = shape
    n_max = (4096 + 256) * 8

    def fused(n: int):
        cfg = get_moe_config.__wrapped__(experts, hidden, inter, n, dtype, None)
        return cfg, align_variant(n, cfg.BLOCK_M)

    starts = distinct_runs(fused, n_max)
    assert {fused(n) for n in starts} == brute_force(fused, n_max)
    assert len(set(map(fused, starts))) == len(starts)  # one call per variant, none twice
    grouped = lambda n: rows_variant(n, experts, hidden, inter, dtype, None, grouped=True)  # noqa: E731
    assert {grouped(n) for n in distinct_runs(grouped, 3 * n_max)} == brute_force(grouped, 3 * n_max)


def test_distinct_runs_cover_a_stored_config_table() -> None:
    tables = sorted(CONFIG_DIR.glob("*.json"))
    assert tables, "no stored MoE config table to check"
    top_k, table = _load_table(str(tables[0]))
    pick = lambda n: nearest_bucket(table, n / top_k)  # noqa: E731  (what a GPU with that table selects)
    assert {pick(n) for n in distinct_runs(pick, 40000)} == brute_force(pick, 40000)


def test_plan_covers_every_moe_config_of_the_kernel_path(monkeypatch) -> None:
    """The tiny model built with the Triton expert path (nothing runs: only the plan)."""
    from server.worker.warmup import first_experts, plan_warmup
    from server.model.loader import load_model
    from server.moe.routing.registry import build_policy

    monkeypatch.setenv("EPSERVE_KERNEL_BACKEND", "triton")
    cfg = app().model
    model = load_model(cfg, policy=build_policy("natural"))
    experts = first_experts(model)
    assert experts.path.compiles
    max_tokens, k = 4096 + 256, model.spec.top_k
    plan = plan_warmup(model, max_tokens=max_tokens, max_seqs=256, width=32, block_size=4)
    warmed = {get_moe_config(experts.num_local, experts.hidden, experts.intermediate, t * k, model.dtype, None)
              for t in plan.prefill_tokens}
    every = {get_moe_config(experts.num_local, experts.hidden, experts.intermediate, t * k, model.dtype, None)
             for t in range(1, max_tokens + 1)}
    assert warmed == every and len(every) > 1
    assert {experts.path.topk_variant(experts, t, k) for t in plan.prefill_tokens} == \
        {experts.path.topk_variant(experts, t, k) for t in range(1, max_tokens + 1)}
    assert max(plan.prefill_tokens) == max_tokens and plan.expert_rows == ()


def greedy(core, prompt: list[int], n: int = 6) -> list[int]:
    from server.engine.api import SamplingParams, StopParams

    core.add_request(EngineRequest(1, tuple(prompt), SamplingParams(temperature=0.0),
                                   StopParams(max_new_tokens=n, ignore_eos=True)))
    tokens = []
    while core.has_work():
        out = core.step()
        for toks in out.token_ids:
            tokens += toks
    return tokens


def test_warm_up_leaves_kv_blocks_and_load_counters_clean() -> None:
    cold = build_engine_core(app(warmup=False))
    try:
        expected = greedy(cold, list(b"warm me up"))
    finally:
        cold.shutdown()
    core = build_engine_core(app(warmup=True))  # on CPU: skipped, nothing compiles
    try:
        assert core.warm_up() is None
        runner = core.executor.runner
        seconds = core.warm_up(force=True)
        assert seconds is not None and seconds > 0
        assert all(not t.any() for layer in runner.kv_caches for t in layer)  # nothing written
        counters = runner.model.load_counters
        assert not counters.expert_tokens.any() and not counters.tokens.any() and not counters.ranks_touched.any()
        assert not counters.lifetime_expert_tokens().any()
        stats = core.stats()
        assert (stats.running, stats.waiting, stats.kv_blocks_used, stats.steps) == (0, 0, 0, 0)
        assert greedy(core, list(b"warm me up")) == expected
    finally:
        core.shutdown()


def test_warm_up_runs_on_every_ep_rank_at_once() -> None:
    import asyncio

    from server.frontend.start import start_engine
    from tests.engine.test_engine_overlap import requests, serve

    config = app(warmup=False, ep_size=2)
    core = build_engine_core(config)
    try:
        assert core.warm_up(force=True) is not None  # both ranks ran the forwards (collectives)
    except BaseException:
        core.shutdown(graceful=False)
        raise
    eng = start_engine(config, core=core)
    try:
        load = asyncio.run(eng.expert_load())
        assert sum(map(sum, load.expert_tokens)) == 0 and sum(load.tokens) == 0
        results = serve(eng, requests()[:4])
        assert all(len(tokens) > 0 for tokens, _, _ in results)
    finally:
        eng.shutdown()


def test_warmup_setting_is_validated() -> None:
    assert app(warmup=False).engine.warmup is False
    with pytest.raises(ConfigError, match="engine.warmup"):
        app(warmup="yes")
    with pytest.raises(ConfigError, match="engine.slow_step_factor"):
        app(slow_step_factor=0.5)


@pytest.mark.parametrize("mla_decode", ["triton_decode", "triton"])
def test_decode_warm_up_covers_every_mla_decode_variant(mla_decode, monkeypatch) -> None:
    """DeepSeek-V3's attention shape on a 132-SM GPU (no GPU needed: only the host-side choice):
    the batch sizes the warm-up runs reach every (config, splits) launch variant of 1..256."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from server.kernels import mla_attention, mla_decode
    from server.layers.attention_triton import KernelAttentionMetadata
    from server.moe.kernels.variants import distinct_runs

    monkeypatch.setattr(mla_decode, "num_sms", lambda device: 132)
    monkeypatch.setattr(mla_attention, "_num_sms", lambda device: 132)
    mla = SimpleNamespace(kv_lora_rank=512, latent_dim=576)
    model = SimpleNamespace(spec=SimpleNamespace(mla=mla, num_heads=128), kernels=SimpleNamespace(mla_decode=mla_decode),
                            dtype=torch.bfloat16, device=torch.device("cpu"))
    variant = lambda s: KernelAttentionMetadata.decode_variant(model, s, 16384, 16)  # noqa: E731
    every = brute_force(variant, 256)
    assert {variant(s) for s in distinct_runs(variant, 256)} == every and len(every) > 1
