"""n choices, top-N logprobs and echo with logprobs through the real `openai` package (sync,
async, streaming), against the same server's gRPC path and against transformers on the same
tiny checkpoint (fp32): the continuation log-likelihood lm-eval reads from echo must equal the
model's own."""
from __future__ import annotations

import asyncio

import openai
import pytest
import torch

from tests.http.conftest import TOKEN

PROMPT = "The quick brown fox"
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def oa(server):
    with openai.OpenAI(base_url=server.http_base_url, api_key=TOKEN, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.model.loader import TINY_MODEL_DIR

    model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL_DIR), attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(TINY_MODEL_DIR))


def _top_dict(tokenizer, alternatives, sampled=None) -> dict[str, float]:
    """The completions shape of one position's alternatives (plus the sampled token), from gRPC's."""
    out = {}
    for token, logprob in alternatives:
        out.setdefault(tokenizer.decode([token]), logprob)
    if sampled is not None:
        out.setdefault(tokenizer.decode([sampled[0]]), sampled[1])
    return out


def _assert_dicts_close(got: list[dict], want: list[dict]) -> None:
    assert [list(g) for g in got] == [list(w) for w in want]
    for g, w in zip(got, want):
        assert list(g.values()) == pytest.approx(list(w.values()), abs=1e-5)


def test_seeded_n_choices_repeat_and_equal_grpc(oa, grpc_client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=11, n=3, extra_body=IGNORE_EOS)
    first, again = oa.completions.create(**kw), oa.completions.create(**kw)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    want = grpc_client.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=11, n=3, ignore_eos=True)
    assert [c.text for c in first.choices] == [w.text for w in want.choices]
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (want.usage.prompt_tokens, 18)
    batch = oa.completions.create(**{**kw, "prompt": [PROMPT, "import os"], "n": 2})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]  # prompt-major: prompt i's j-th is i * n + j
    assert [c.text for c in batch.choices[:2]] == [w.text for w in want.choices[:2]]


def test_greedy_chat_choices_are_equal_streamed_or_not(oa):
    messages = [{"role": "user", "content": "print hello"}]
    whole = oa.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, n=2,
                                       extra_body=IGNORE_EOS)
    assert whole.choices[0].message.content == whole.choices[1].message.content
    assert whole.usage.completion_tokens == 12
    texts = {0: "", 1: ""}
    chunks = list(oa.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, n=2,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body=IGNORE_EOS))
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {0: whole.choices[0].message.content, 1: whole.choices[1].message.content}
    assert chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == \
        whole.usage.model_dump(include={"prompt_tokens", "completion_tokens"})


def test_top_n_logprobs_equal_grpc_in_both_shapes(oa, grpc_client, hf):
    _, tok = hf
    want = grpc_client.generate(PROMPT, max_new_tokens=5, temperature=0.0, top_logprobs=3, ignore_eos=True)
    got = oa.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                extra_body=IGNORE_EOS).choices[0].logprobs
    assert got.token_logprobs == pytest.approx(list(want.logprobs), abs=1e-5)
    _assert_dicts_close(got.top_logprobs, [_top_dict(tok, top, (t, lp)) for top, t, lp in
                                           zip(want.top_logprobs, want.token_ids, want.logprobs)])
    assert got.text_offset[0] == 0 and got.text_offset[1] == len(got.tokens[0])
    chat = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=5,
                                      temperature=0, logprobs=True, top_logprobs=3, extra_body=IGNORE_EOS)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  tokenize=True)["input_ids"]
    want = grpc_client.generate(ids, max_new_tokens=5, temperature=0.0, top_logprobs=3, ignore_eos=True)
    content = chat.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(list(want.logprobs), abs=1e-5)
    for entry, top in zip(content, want.top_logprobs):
        assert [a.token for a in entry.top_logprobs] == [tok.decode([t]) for t, _ in top]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx([lp for _, lp in top], abs=1e-5)
        assert entry.bytes == list(entry.token.encode())


def test_echo_logprobs_are_the_engines_prompt_logprobs(oa, grpc_client, hf):
    _, tok = hf
    want = grpc_client.generate(PROMPT, max_new_tokens=3, temperature=0.0, top_logprobs=2, prompt_logprobs=True,
                                ignore_eos=True)
    got = oa.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True,
                                extra_body=IGNORE_EOS).choices[0]
    p = want.usage.prompt_tokens
    lp = got.logprobs
    assert got.text.startswith(PROMPT) and len(lp.tokens) == p + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    assert lp.token_logprobs[1:] == pytest.approx(list(want.prompt_logprobs) + list(want.logprobs), abs=1e-5)
    prompt_ids = tok(PROMPT)["input_ids"]
    _assert_dicts_close(lp.top_logprobs[1:p], [_top_dict(tok, top, (t, v)) for top, t, v in
                                               zip(want.prompt_top_logprobs, prompt_ids[1:], want.prompt_logprobs)])


def test_continuation_loglikelihood_by_echo_equals_transformers(server, hf):
    """lm-eval's loglikelihood request (echo, logprobs 1; max_tokens 1, and 0 as vLLM takes it),
    read as lm-eval reads it, over the async client, streamed and not; n 2 under echo too."""
    model, tok = hf
    context, continuation = tok("def main():\n")["input_ids"], tok("    return 0")["input_ids"]
    ids = context + continuation
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    per_token = logits[len(context) - 1:-1].gather(1, torch.tensor(continuation)[:, None])[:, 0]
    greedy = bool((logits[len(context) - 1:-1].argmax(-1) == torch.tensor(continuation)).all())

    async def run():
        async with openai.AsyncOpenAI(base_url=server.http_base_url, api_key=TOKEN, max_retries=0) as c:
            kw = dict(model="tiny", prompt=ids, temperature=0, logprobs=1, echo=True, seed=1234)
            one = await c.completions.create(max_tokens=1, **kw)
            zero = await c.completions.create(max_tokens=0, **kw)
            events = [e async for e in await c.completions.create(max_tokens=0, stream=True, n=2, **kw)]
            return one, zero, events

    one, zero, events = asyncio.run(run())
    lp = one.choices[0].logprobs
    total = sum(lp.token_logprobs[len(context):-1])  # lm-eval's slice: the generated token is the last
    is_greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[len(context):-1],
                                                             lp.top_logprobs[len(context):-1]))
    assert total == pytest.approx(float(per_token.sum()), abs=1e-4) and is_greedy == greedy
    zl = zero.choices[0].logprobs
    assert len(zl.tokens) == len(ids) and zero.usage.completion_tokens == 0 and zero.choices[0].finish_reason == "length"
    assert zl.token_logprobs[len(context):] == pytest.approx(per_token.tolist(), abs=1e-4)
    assert zero.choices[0].text == tok.decode(ids)
    streamed = {0: [], 1: []}
    for e in events:
        for c in e.choices:
            streamed[c.index] += c.logprobs.token_logprobs if c.logprobs else []
    for values in streamed.values():  # batched with its sibling: equal up to float noise
        assert values[0] is None and values[1:] == pytest.approx(zl.token_logprobs[1:], abs=1e-5)
