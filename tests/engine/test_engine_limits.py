"""Engine limits and request life cycle (ep 1): cancellation frees KV blocks at once, bounded
queue, KV-capacity refusal, preemption under memory pressure, max_model_len, stop strings,
stop tokens, EOS, request validation, shutdown."""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from server.engine.api import EngineUnavailableError, FinishReason, InvalidRequestError, ResourceExhaustedError
from server.frontend.start import start_engine
from tests.engine.test_engine_generate import MAX_NEW, PROMPTS, build_model_folder, hf_greedy, make_app, request, serve_all


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe_limits")
    model = build_model_folder(folder, seed=1)
    expected = [hf_greedy(model, p, MAX_NEW) for p in PROMPTS]
    return folder, model, expected


@pytest.fixture
def make_engine():
    engines = []

    def make(folder, **kw):
        max_model_len = kw.pop("max_model_len", None)
        app = make_app(folder, **kw)
        if max_model_len is not None:
            from dataclasses import replace

            app = replace(app, model=replace(app.model, max_model_len=max_model_len))
        eng = start_engine(app, in_thread=True)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.shutdown()


def test_cancelling_a_stream_frees_its_blocks_at_once(qwen3, make_engine) -> None:
    folder, _, _ = qwen3
    eng = make_engine(folder, max_model_len=512)

    async def main():
        gen = eng.generate(request(0, PROMPTS[2], max_new=400))
        await gen.__anext__()
        stats = eng.stats()
        assert stats.running == 1 and stats.kv_blocks_used > 0
        await gen.aclose()
        stats = eng.stats()
        assert stats.running == 0 and stats.kv_blocks_used == 0

        async def consume():
            async for _ in eng.generate(request(1, PROMPTS[1], max_new=400)):
                pass

        task = asyncio.create_task(consume())
        while eng.stats().running == 0:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = eng.stats()
        assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0

    asyncio.run(main())


def test_full_queue_is_refused_and_waiting_requests_can_be_cancelled(qwen3, make_engine) -> None:
    folder, _, _ = qwen3
    eng = make_engine(folder, max_model_len=512, max_num_seqs=1, max_queue=1)

    async def main():
        running = eng.generate(request(0, PROMPTS[0], max_new=400))
        await running.__anext__()
        waiting = asyncio.ensure_future(eng.generate(request(1, PROMPTS[1])).__anext__())
        while eng.stats().waiting == 0:
            await asyncio.sleep(0.005)
        with pytest.raises(ResourceExhaustedError, match="max_queue"):
            await eng.generate(request(2, PROMPTS[2])).__anext__()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await running.aclose()
        stats = eng.stats()
        assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)

    asyncio.run(main())


def test_a_request_that_can_never_fit_the_cache_is_refused(qwen3, make_engine) -> None:
    folder, _, expected = qwen3
    eng = make_engine(folder, kv_cache_tokens=32)
    with pytest.raises(ResourceExhaustedError, match="kv_cache_tokens"):
        serve_all(eng, [request(0, PROMPTS[2], max_new=30)])  # 13 + 30 - 1 > 32
    (tokens, _, _), = serve_all(eng, [request(0, PROMPTS[2])])  # 13 + 10 - 1 fits
    assert tokens == expected[2]


def test_preemption_under_memory_pressure_changes_no_result(qwen3, make_engine) -> None:
    folder, _, expected = qwen3
    eng = make_engine(folder, kv_cache_tokens=40, max_num_seqs=5)  # 10 blocks for ~74 tokens of demand
    results = serve_all(eng, [request(i, p) for i, p in enumerate(PROMPTS)], stagger=0.0)
    assert [r[0] for r in results] == expected
    assert eng.core.scheduler.num_preemptions > 0
    assert eng.stats().kv_blocks_used == 0


def test_max_model_len(qwen3, make_engine) -> None:
    folder, _, expected = qwen3
    eng = make_engine(folder, max_model_len=16)
    with pytest.raises(InvalidRequestError) as err:
        serve_all(eng, [request(0, list(range(16)))])
    assert err.value.field == "prompt_token_ids" and "max_model_len" in str(err.value)
    (tokens, _, last), = serve_all(eng, [request(0, PROMPTS[2])])  # 13 prompt tokens: room for 3
    assert tokens == expected[2][:3]
    assert last.finish_reason is FinishReason.LENGTH and last.usage.completion_tokens == 3


def test_stop_string_cuts_the_text_before_the_match(qwen3, make_engine) -> None:
    folder, _, _ = qwen3
    eng = make_engine(folder)
    (tokens, text, last), = serve_all(eng, [request(0, PROMPTS[3], max_new=20)])
    k = next(k for k in range(1, len(text) - 2)
             if "\ufffd" not in text[k:k + 2] and text.find(text[k:k + 2]) == k)
    stop = text[k:k + 2]
    (s_tokens, s_text, s_last), = serve_all(eng, [request(0, PROMPTS[3], max_new=20, stop=(stop,))])
    assert s_text == text[:k]
    assert s_last.finish_reason is FinishReason.STOP
    assert s_tokens == tokens[:len(s_tokens)] and len(s_tokens) < len(tokens)
    assert stop in eng.decode(s_tokens)


def test_stop_token_ids_and_eos(qwen3, make_engine, tmp_path) -> None:
    folder, _, expected = qwen3
    eng = make_engine(folder)
    want = expected[1]
    stop_tok = want[3]
    cut = want.index(stop_tok) + 1
    (tokens, text, last), = serve_all(eng, [request(0, PROMPTS[1], stop_token_ids=(stop_tok,))])
    assert tokens == want[:cut] and last.finish_reason is FinishReason.STOP
    assert text == eng.decode(want[:cut - 1])  # the stop token's text is not output
    # The same token as the model's EOS: stops unless ignore_eos.
    eos_folder = tmp_path / "with_eos"
    shutil.copytree(folder, eos_folder)
    cfg = json.loads((eos_folder / "config.json").read_text())
    (eos_folder / "config.json").write_text(json.dumps({**cfg, "eos_token_id": stop_tok}))
    eos_eng = make_engine(eos_folder)
    assert eos_eng.model_info().eos_token_ids == (stop_tok,)
    (tokens, _, last), = serve_all(eos_eng, [request(0, PROMPTS[1], ignore_eos=False)])
    assert tokens == want[:cut] and last.finish_reason is FinishReason.STOP
    (tokens, _, last), = serve_all(eos_eng, [request(0, PROMPTS[1], ignore_eos=True)])
    assert tokens == want and last.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("field, kwargs", [
    ("prompt_token_ids", dict(prompt=[])),
    ("prompt_token_ids", dict(prompt=[1, 320])),
    ("prompt_token_ids", dict(prompt=[-1])),
    ("prompt_token_ids", dict(prompt=[1, 2.0, 3])),  # an int-valued float is still not a token id
    ("prompt_token_ids", dict(prompt=[True, 2])),
    ("sampling.temperature", dict(temperature=-0.5)),
    ("sampling.top_p", dict(sampling={"top_p": 0.0})),
    ("sampling.top_k", dict(sampling={"top_k": -1})),
    ("stops.max_new_tokens", dict(max_new=0)),
    ("stops.stop", dict(stop=("",))),
    ("stops.stop_token_ids", dict(stop_token_ids=(1000,))),
])
def test_bad_requests_name_the_field(qwen3, make_engine, field, kwargs) -> None:
    folder, _, _ = qwen3
    eng = make_engine(folder)
    prompt = kwargs.pop("prompt", [1, 2, 3])
    with pytest.raises(InvalidRequestError) as err:
        serve_all(eng, [request(0, prompt, **kwargs)])
    assert err.value.field == field
    assert eng.stats().waiting == 0


def test_unseeded_requests_draw_their_own_seed(qwen3, make_engine) -> None:
    folder, _, _ = qwen3
    eng = make_engine(folder)
    a, b = serve_all(eng, [request(0, PROMPTS[1], temperature=1.0), request(1, PROMPTS[1], temperature=1.0)])
    assert a[0] != b[0]


def test_shutdown_ends_streams_and_refuses_new_requests(qwen3, make_engine) -> None:
    folder, _, _ = qwen3
    eng = make_engine(folder, max_model_len=512)

    async def main():
        gen = eng.generate(request(0, PROMPTS[0], max_new=400))
        await gen.__anext__()
        await asyncio.to_thread(eng.shutdown)
        with pytest.raises(EngineUnavailableError):
            async for _ in gen:
                pass
        with pytest.raises(EngineUnavailableError):
            await eng.generate(request(1, PROMPTS[0])).__anext__()

    asyncio.run(main())
    assert eng.failure is None  # a clean shutdown is not a failure
