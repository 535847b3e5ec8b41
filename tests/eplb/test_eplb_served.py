"""Online EPLB in the served path: a gRPC server at ep 2 over gloo rebalances every two steps
(expert weights moving between ranks) while concurrent greedy streams run and the routing
policy is switched live, on Qwen3-MoE and on DeepSeek-V3 (MLA, grouped sigmoid routing, a dense
first layer). Every stream's tokens equal transformers' greedy generate: neither the moves nor
the switches change an output."""
from __future__ import annotations

import re
import threading

import pytest

from clients import Client
from tests.engine.test_engine_generate import PROMPTS, build_model_folder, hf_greedy
from tests.helpers.server_process import ServerProcess

NEW_TOKENS = 12


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_rebalances_under_load_and_live_switches_keep_greedy_outputs(family, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    model = build_model_folder(folder, family=family, seed=5)
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    results, failures = {}, []
    with ServerProcess(tmp_path, f"model.path={folder}", "model.max_model_len=64", "parallel=ep2",
                       "parallel.redundant_experts=2", "parallel.eplb_interval=2", "server.allow_routing_switch=true",
                       "engine.max_num_seqs=3", "engine.max_num_batched_tokens=8", "engine.kv_cache_tokens=512",
                       "engine.kv_block_size=4") as srv:
        def run(i: int) -> None:
            try:
                with Client(srv.target, timeout=120) as c:
                    results[i] = list(c.generate(PROMPTS[i], max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids)
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        with Client(srv.target, timeout=120) as c:
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
            for t in threads:
                t.start()
            for seed in range(1, 5):  # live switches between the rebalancing steps
                assert c.set_routing_policy("natural", seed=seed).name == "natural"
            for t in threads:
                t.join(120)
            assert not failures, failures
            assert [results[i] for i in range(len(PROMPTS))] == expected
            log = srv.log()
    moved = [int(m) for m in re.findall(r"EPLB rebalance: \d+ of \d+ layers re-placed, (\d+) experts moved", log)]
    assert moved and sum(moved) > 0, log[-3000:]  # weights did cross ranks while serving
