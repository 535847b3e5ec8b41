"""Routed experts per token from the engine core: one row per position the model ran, the
prompt's rows only when asked for, at ep 1 and ep 2 (gloo); and under CUDA graphs the same ids
as eager decode (GPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from server.config import AppConfig
from server.engine.api import RoutedExpertsMode, SamplingParams, StopParams
from server.core.step_io import EngineRequest

PROMPTS = [list(range(3, 40)), [5, 6, 7], list(range(50, 61))]
NEW = 6


def _app(ep_size: int, device: str = "cpu") -> AppConfig:
    return AppConfig.from_dict({"model": {"name": "tiny"}, "parallel": {"ep_size": ep_size, "device": device},
                                "engine": {"kv_cache_tokens": 512, "kv_block_size": 16, "max_num_seqs": 8,
                                           "max_num_batched_tokens": 16}})  # small budget: prompts run in chunks


def _generate(core, mode: RoutedExpertsMode) -> dict[int, tuple[list[int], np.ndarray | None]]:
    """Greedy generations of PROMPTS -> req_id: (tokens, routed [rows, L, k] or None)."""
    spec = core.spec
    for i, p in enumerate(PROMPTS):
        core.add_request(EngineRequest(i, tuple(p), SamplingParams(temperature=0.0),
                                       StopParams(max_new_tokens=NEW, ignore_eos=True), routed_experts=mode))
    tokens: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    routed: dict[int, list[bytes]] = {i: [] for i in range(len(PROMPTS))}
    for _ in range(200):
        out = core.step()
        for j, req_id in enumerate(out.req_ids):
            tokens[req_id] += out.token_ids[j]
            if out.routed is not None and out.routed[j] is not None:
                routed[req_id].append(out.routed[j])
        if all(len(t) == NEW for t in tokens.values()) and not core.has_work():
            break
    shape = (-1, spec.num_moe_layers, spec.top_k)
    return {i: (tokens[i], np.frombuffer(b"".join(routed[i]), dtype="<u2").reshape(shape) if routed[i] else None)
            for i in tokens}


@pytest.mark.parametrize("ep_size", [1, 2])
def test_one_row_per_position_and_prompt_rows_on_request(ep_size) -> None:
    from server.core.startup import build_engine_core

    core = build_engine_core(_app(ep_size))
    try:
        spec = core.spec
        none = _generate(core, RoutedExpertsMode.NONE)
        generated = _generate(core, RoutedExpertsMode.GENERATED)
        with_prompt = _generate(core, RoutedExpertsMode.WITH_PROMPT)
    finally:
        core.shutdown(graceful=True)
    for i, prompt in enumerate(PROMPTS):
        assert none[i][1] is None and none[i][0] == generated[i][0] == with_prompt[i][0]
        gen, full = generated[i][1], with_prompt[i][1]
        assert gen.shape == (NEW, spec.num_moe_layers, spec.top_k)
        assert full.shape == (len(prompt) + NEW - 1, spec.num_moe_layers, spec.top_k)
        assert np.array_equal(full[len(prompt) - 1:], gen)  # natural routing: the same positions, the same ids
        assert (full < spec.num_experts).all()
        assert all(len(set(row)) == spec.top_k for row in full.reshape(-1, spec.top_k).tolist())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["natural", "greedy_balanced"])
def test_routed_experts_under_cuda_graphs_equal_eager(monkeypatch, policy) -> None:
    from server.core.startup import build_engine_core

    def run(graphs: bool):
        monkeypatch.setenv("EPSERVE_CUDA_GRAPHS", "1" if graphs else "0")
        core = build_engine_core(_app(1, "cuda"))
        try:
            if policy != "natural":
                core.switch_routing_policy({"name": policy})
            runner = core.executor.runner
            assert (runner.decode_graphs is not None) == graphs
            out = _generate(core, RoutedExpertsMode.WITH_PROMPT)
            recording = any(name.endswith("+routed experts") for name in runner.policies._graphs)
            return out, recording
        finally:
            core.shutdown(graceful=True)

    graphed, recording = run(True)
    assert recording  # decode captured (and replayed) the graphs that record
    eager, _ = run(False)
    for i in graphed:
        assert graphed[i][0] == eager[i][0]
        assert np.array_equal(graphed[i][1], eager[i][1]), i
