"""The real `openai` package (sync and async, streaming and not) against the HTTP front end:
greedy outputs equal the gRPC path's, token for token, for text and token-id prompts."""
from __future__ import annotations

import asyncio
import base64

import openai
import pytest

from tests.http.conftest import TOKEN

PROMPTS = ["import os", "def main():\n", "The quick brown fox"]


@pytest.fixture(scope="module")
def oa(server):
    with openai.OpenAI(base_url=server.http_base_url, api_key=TOKEN, max_retries=0, timeout=60) as c:
        yield c


def grpc_greedy(grpc_client, prompt, n=12, **kw):
    return grpc_client.generate(prompt, max_new_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_models_lists_the_served_model(oa, grpc_client):
    assert [m.id for m in oa.models.list().data] == [grpc_client.info().model_name]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_grpc(oa, grpc_client, prompt):
    want = grpc_greedy(grpc_client, prompt)
    got = oa.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens, 12)


def test_token_id_prompts_and_a_batch_of_them(oa, grpc_client):
    ids = [list(grpc_greedy(grpc_client, p, n=1).token_ids) + [10, 32] for p in PROMPTS[:2]]
    want = [grpc_greedy(grpc_client, i).text for i in ids]
    got = oa.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0,
                                extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == want


def test_streamed_completion_joins_to_the_grpc_text_and_reports_usage(oa, grpc_client):
    want = grpc_greedy(grpc_client, PROMPTS[0])
    chunks = list(oa.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert len(chunks) > 2  # streamed, not one blob
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_logprobs_of_the_sampled_token_equal_grpc(oa, grpc_client):
    want = grpc_greedy(grpc_client, PROMPTS[1], n=6, logprobs=True)
    got = oa.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=0,
                                extra_body={"ignore_eos": True})
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(list(want.logprobs), abs=1e-6)
    assert "".join(got.choices[0].logprobs.tokens) == want.text


def test_seeded_sampling_equals_grpc_with_the_same_seed(oa, grpc_client):
    want = grpc_client.generate(PROMPTS[2], max_new_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    got = oa.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=10, temperature=1.0, seed=1234,
                                extra_body={"ignore_eos": True})
    assert got.choices[0].text == want.text


def test_penalties_min_p_and_min_tokens_equal_grpc(oa, grpc_client):
    """The engine's sampling fields reach it from both front ends alike, and they change the output."""
    fields = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.3, "min_p": 0.05,
              "min_tokens": 4}
    plain = grpc_greedy(grpc_client, PROMPTS[2], n=16)
    want = grpc_greedy(grpc_client, PROMPTS[2], n=16, **fields)
    assert want.text != plain.text
    got = oa.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                frequency_penalty=1.5, presence_penalty=0.5,
                                extra_body={"ignore_eos": True, "repetition_penalty": 1.3, "min_p": 0.05,
                                            "min_tokens": 4})
    assert got.choices[0].text == want.text


def test_echo_and_stop(oa, grpc_client):
    want = grpc_greedy(grpc_client, PROMPTS[0])
    stop = want.text[3:5]
    got = oa.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, echo=True, stop=stop,
                                extra_body={"ignore_eos": True})
    expected = grpc_client.generate(PROMPTS[0], max_new_tokens=12, temperature=0.0, stop=[stop], ignore_eos=True)
    assert got.choices[0].text == PROMPTS[0] + expected.text
    assert got.choices[0].finish_reason == "stop"


def test_chat_uses_the_checkpoint_template_and_equals_grpc(oa, server, grpc_client):
    from transformers import AutoTokenizer

    from server.model.loader import TINY_MODEL_DIR

    messages = [{"role": "user", "content": "print hello"}]
    ids = AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    want = grpc_greedy(grpc_client, ids, n=8)
    got = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(ids)
    streamed = list(oa.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True}))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want.text


def test_extensions_routed_experts_and_routing_echo(oa, grpc_client):
    want = grpc_greedy(grpc_client, PROMPTS[0], n=4, return_routed_experts=True)
    got = oa.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                extra_body={"ignore_eos": True, "return_routed_experts": True, "routing": "natural"})
    routed = got.choices[0].model_extra["routed_experts"]
    flat = [e for row in want.routed_experts for layer in row for e in layer]
    raw = base64.b64decode(routed["ids"])
    assert [int.from_bytes(raw[i:i + 2], "little") for i in range(0, len(raw), 2)] == flat
    assert got.model_extra["routing"]["name"] == grpc_client.routing_policy().name


def test_async_client_streams_and_completes(server, grpc_client):
    want = [grpc_greedy(grpc_client, p).text for p in PROMPTS]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.http_base_url, api_key=TOKEN, max_retries=0) as c:
            async def whole(p):
                r = await c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0,
                                               extra_body={"ignore_eos": True})
                return r.choices[0].text

            async def streamed(p):
                s = await c.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
                return "".join([ch.choices[0].text async for ch in s])

            return await asyncio.gather(*(whole(p) for p in PROMPTS), *(streamed(p) for p in PROMPTS))

    assert asyncio.run(run()) == want + want
