"""DeepSeek-V3 served by the engine (CPU, gloo at ep 2) against transformers' greedy `generate`,
one prompt at a time: MLA over the paged latent cache, group-limited sigmoid routing with its
correction bias, shared experts, a dense first layer (deepseek_v3) or a plain q projection
(deepseek_v3_qproj). Its own module: an ep-2 engine owns the process group, so it must not
overlap the module-scoped engines of test_engine_generate.py."""
from __future__ import annotations

import pytest

from server.frontend.start import start_engine
from tests.engine.test_engine_generate import PROMPTS, build_model_folder, hf_greedy, make_app, request, serve_all

NEW_TOKENS = 16


@pytest.mark.parametrize("family,ep", [("deepseek_v3", 1), ("deepseek_v3", 2), ("deepseek_v3_qproj", 1)])
def test_greedy_matches_transformers_for_a_concurrent_mixed_length_batch(family, ep, tmp_path) -> None:
    """16 greedy tokens for prompts of 1-13 tokens served together (chunked prefill, a 3-sequence
    limit that queues two, staggered arrivals)."""
    model = build_model_folder(tmp_path, family=family, seed=5)
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    eng = start_engine(make_app(tmp_path, ep_size=ep), in_thread=True)
    try:
        results = serve_all(eng, [request(i, p, max_new=NEW_TOKENS) for i, p in enumerate(PROMPTS)])
        assert [r[0] for r in results] == expected
        assert eng.model_info().architecture == "DeepseekV3ForCausalLM"
    finally:
        eng.shutdown()
