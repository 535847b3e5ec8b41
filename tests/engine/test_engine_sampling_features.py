"""Penalties, min_p, min_tokens, top-N and prompt logprobs through the whole engine (CPU).

Oracle: the transformers model on the same checkpoint, fp32. Greedy runs make each feature's
effect exact: the engine's tokens must equal a greedy loop over the reference logits with the
feature's rule applied (transformers' own processors where it has them). The engine serves
under chunked prefill (8-token budget) and overlapped steps, at ep 1 and 2.
"""
from __future__ import annotations

import asyncio

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from server.engine.api import FinishReason, GenerationRequest, SamplingParams, StopParams
from server.frontend.start import start_engine
from tests.engine.test_engine_generate import PROMPTS, build_model_folder, make_app, serve_all

MAX_NEW = 8


@pytest.fixture(scope="module")
def hf_and_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe_sampling")
    model = build_model_folder(folder)
    return model, folder


@pytest.fixture(scope="module", params=[1, 2], ids=["ep1", "ep2"])
def engine(request, hf_and_folder):
    _, folder = hf_and_folder
    eng = start_engine(make_app(folder, ep_size=request.param), in_thread=True)
    yield eng
    eng.shutdown()


def _req(i: int, prompt, sampling: dict | None = None, max_new: int = MAX_NEW, **fields) -> GenerationRequest:
    stops = dict(max_new_tokens=max_new, ignore_eos=True)
    stops.update(fields.pop("stops", {}))
    return GenerationRequest(f"r{i}", tuple(prompt), SamplingParams(**{"temperature": 0.0, **(sampling or {})}),
                             StopParams(**stops), **fields)


@torch.no_grad()
def _logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] float32 reference logits of every position."""
    return model(torch.tensor([tokens])).logits[0].float()


@torch.no_grad()
def _greedy_with(model, prompt: list[int], n: int, process) -> list[int]:
    """Greedy decoding over the reference logits, `process(tokens so far, logits [V])` applied each step."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(process(tokens, _logits(model, tokens)[-1]).argmax()))
    return tokens[len(prompt):]


def _chunks(engine, req):
    async def run():
        return [c async for c in engine.generate(req)]

    return asyncio.run(run())


def test_repetition_penalty_equals_transformers_generate(engine, hf_and_folder) -> None:
    model, _ = hf_and_folder
    reqs = [_req(i, p, {"repetition_penalty": 1.8}) for i, p in enumerate(PROMPTS)]
    results = serve_all(engine, reqs)
    changed = 0
    for prompt, (tokens, _, _) in zip(PROMPTS, results):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, repetition_penalty=1.8)
        assert tokens == out[0, len(prompt):].tolist()
        changed += tokens != _greedy_with(model, prompt, MAX_NEW, lambda t, lg: lg)
    assert changed  # the penalty changed some output


def test_presence_and_frequency_penalties_equal_a_greedy_reference(engine, hf_and_folder) -> None:
    model, _ = hf_and_folder
    presence, frequency = 1.5, 0.75

    def penalize(tokens, logits, prompt_len):
        out = logits.clone()
        generated = tokens[prompt_len:]
        for tok in set(generated):
            out[tok] -= presence + frequency * generated.count(tok)
        return out

    sampling = {"presence_penalty": presence, "frequency_penalty": frequency}
    # alongside requests without penalties: their outputs must stay plain greedy
    reqs = [_req(i, p, sampling if i % 2 == 0 else None) for i, p in enumerate(PROMPTS)]
    results = serve_all(engine, reqs, stagger=0.0)
    for i, (prompt, (tokens, _, _)) in enumerate(zip(PROMPTS, results)):
        n = len(prompt)
        rule = (lambda t, lg, n=n: penalize(t, lg, n)) if i % 2 == 0 else (lambda t, lg: lg)
        assert tokens == _greedy_with(model, prompt, MAX_NEW, rule), i
        if i % 2 == 0:
            assert tokens != _greedy_with(model, prompt, MAX_NEW, lambda t, lg: lg), i  # the penalties bite


def test_min_p_one_keeps_only_the_best_token(engine, hf_and_folder) -> None:
    """At min_p = 1 only tokens as likely as the best survive: sampling at any temperature is greedy."""
    model, _ = hf_and_folder
    prompt = PROMPTS[2]
    greedy = _greedy_with(model, prompt, MAX_NEW, lambda t, lg: lg)
    (tokens, _, _), = serve_all(engine, [_req(0, prompt, {"temperature": 1.5, "min_p": 1.0, "seed": 7})])
    assert tokens == greedy
    (hot, _, _), = serve_all(engine, [_req(0, prompt, {"temperature": 1.5, "seed": 7})])
    assert hot != greedy  # without min_p this seed samples off the greedy path


def test_min_p_cuts_what_the_torch_reference_cuts(engine, hf_and_folder) -> None:
    """Hot sampling with min_p: every drawn token passes the reference rule at its position."""
    model, _ = hf_and_folder
    temperature, min_p, prompt = 2.0, 0.2, PROMPTS[1]

    def passes(tokens):
        logits = _logits(model, prompt + tokens)[len(prompt) - 1:-1]  # [n, V]
        probs = (logits / temperature).softmax(-1)
        chosen = probs.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        return bool((chosen >= min_p * probs.max(-1).values - 1e-6).all())

    uncut = 0
    for seed in range(3):
        (tokens, _, _), = serve_all(engine, [_req(0, prompt, {"temperature": temperature, "min_p": min_p, "seed": seed})])
        assert passes(tokens), seed
        (plain, _, _), = serve_all(engine, [_req(0, prompt, {"temperature": temperature, "seed": seed})])
        uncut += not passes(plain)
    assert uncut  # without min_p these seeds draw tokens the cut removes


def test_min_tokens_holds_back_stop_tokens(engine, hf_and_folder) -> None:
    model, _ = hf_and_folder
    prompt = PROMPTS[1]
    plain = _greedy_with(model, prompt, MAX_NEW, lambda t, lg: lg)
    stop = plain[1]  # without min_tokens the output ends at its second token
    (tokens, _, last), = serve_all(engine, [_req(0, prompt, stops={"stop_token_ids": (stop,)})])
    assert tokens == plain[:2] and last.finish_reason is FinishReason.STOP
    min_tokens = 5

    def banned(t, lg):
        return lg.index_fill(0, torch.tensor([stop]), float("-inf")) if len(t) - len(prompt) < min_tokens else lg

    want = _greedy_with(model, prompt, MAX_NEW, banned)
    cut = next((i + 1 for i, t in enumerate(want) if t == stop), MAX_NEW)
    (tokens, _, last), = serve_all(engine, [_req(0, prompt, stops={"stop_token_ids": (stop,), "min_tokens": min_tokens})])
    assert tokens == want[:cut] and len(tokens) >= min_tokens
    assert stop not in tokens[:min_tokens]


def test_top_logprobs_equal_the_reference_top_k(engine, hf_and_folder) -> None:
    model, _ = hf_and_folder
    prompt, k = PROMPTS[3], 5
    chunks = _chunks(engine, _req(0, prompt, logprobs=True, top_logprobs=k))
    tokens = [t for c in chunks for t in c.token_ids]
    tops = [position for c in chunks for position in c.top_logprobs]
    assert len(tops) == len(tokens) == MAX_NEW
    ref = _logits(model, prompt + tokens)[len(prompt) - 1:-1].log_softmax(-1)  # [n, V]
    want_lp, want_ids = ref.topk(k, dim=-1)
    for i, position in enumerate(tops):
        assert [t for t, _ in position] == want_ids[i].tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in position]), want_lp[i], rtol=0, atol=1e-4)
        assert position[0][0] == tokens[i]  # greedy: the drawn token is the best one


def test_prompt_logprobs_equal_the_reference(engine, hf_and_folder) -> None:
    model, _ = hf_and_folder
    prompts = [PROMPTS[2], PROMPTS[4], PROMPTS[3]]  # 13 tokens (two prefill chunks), 1 token, 8 tokens
    tops = [4, 0, 2]  # prompt positions' top-N too where the request asks top_logprobs
    reqs = [_req(i, p, prompt_logprobs=True, max_new=3, top_logprobs=k) for i, (p, k) in enumerate(zip(prompts, tops))]

    async def run():
        return await asyncio.gather(*[_collect_chunks(engine, r) for r in reqs])

    for prompt, k, chunks in zip(prompts, tops, asyncio.run(run())):
        got = chunks[0].prompt_logprobs
        assert all(c.prompt_logprobs is None and c.prompt_top_logprobs is None for c in chunks[1:])
        ref_all = _logits(model, prompt)[:-1].log_softmax(-1)
        ref = ref_all.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        assert len(got) == len(prompt) - 1
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), ref, rtol=0, atol=1e-4)
        if not k:
            assert chunks[0].prompt_top_logprobs is None
            continue
        got_top = chunks[0].prompt_top_logprobs
        assert len(got_top) == len(prompt) - 1 and all(len(p) == k for p in got_top)
        want_lp, want_ids = ref_all.topk(k, dim=-1)
        assert [[t for t, _ in p] for p in got_top] == want_ids.tolist()
        torch.testing.assert_close(torch.tensor([[lp for _, lp in p] for p in got_top]), want_lp, rtol=0, atol=1e-4)


async def _collect_chunks(engine, req):
    return [c async for c in engine.generate(req)]


def test_features_off_leave_outputs_unchanged(engine, hf_and_folder) -> None:
    """Neutral values (penalty 1 / 0, min_p 0, min_tokens 0) give the plain greedy output."""
    model, _ = hf_and_folder
    neutral = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}
    results = serve_all(engine, [_req(i, p, neutral) for i, p in enumerate(PROMPTS)])
    for prompt, (tokens, _, _) in zip(PROMPTS, results):
        assert tokens == _greedy_with(model, prompt, MAX_NEW, lambda t, lg: lg)


def test_penalties_survive_preemption(hf_and_folder) -> None:
    """A cache too small for every sequence at once preempts and recomputes some: the counts
    are rebuilt from the recomputed tokens, so the outputs equal the reference."""
    model, folder = hf_and_folder
    eng = start_engine(make_app(folder, kv_cache_tokens=48, kv_block_size=4, max_num_seqs=4), in_thread=True)
    try:
        sampling = {"repetition_penalty": 1.5, "frequency_penalty": 0.5}
        prompts = [PROMPTS[1], PROMPTS[3], PROMPTS[1], PROMPTS[3]]
        results = serve_all(eng, [_req(i, p, sampling, max_new=12) for i, p in enumerate(prompts)], stagger=0.0)
        assert eng.core.scheduler.num_preemptions > 0
        assert eng.stats().kv_blocks_used == 0
    finally:
        eng.shutdown()

    def rule(prompt_len):
        def apply(tokens, logits):
            out = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([tokens]), logits[None].clone())[0]
            generated = tokens[prompt_len:]
            for tok in set(generated):
                out[tok] -= 0.5 * generated.count(tok)
            return out
        return apply

    changed = 0
    for prompt, (tokens, _, _) in zip(prompts, results):
        assert tokens == _greedy_with(model, prompt, 12, rule(len(prompt)))
        changed += tokens != _greedy_with(model, prompt, 12, lambda t, lg: lg)
    assert changed  # the penalties changed some output


def _by_index(chunks) -> dict[int, list]:
    out: dict[int, list] = {}
    for c in chunks:
        out.setdefault(c.index, []).append(c)
    return out


def test_n_sequences_under_a_seed_are_reproducible_and_equal_single_runs(engine) -> None:
    """n = 3 from a 13-token prompt (3 shared blocks of 4): each sequence is what a request of
    its own with seed + i gives, so sharing the prompt's KV changes no token."""
    prompt, seed = PROMPTS[2], 42
    sampling = {"temperature": 0.9, "top_p": 0.95, "seed": seed}
    forks = engine.core.scheduler.num_forks
    runs = [_by_index(_chunks(engine, _req(0, prompt, sampling, n=3))) for _ in range(2)]
    assert engine.core.scheduler.num_forks == forks + 4  # two runs, two sequences each on shared blocks
    assert runs[0].keys() == {0, 1, 2}
    seqs = {i: [t for c in chunks for t in c.token_ids] for i, chunks in runs[0].items()}
    again = {i: [t for c in chunks for t in c.token_ids] for i, chunks in runs[1].items()}
    assert seqs == again
    for i, chunks in runs[0].items():
        assert chunks[-1].finish_reason is FinishReason.LENGTH and chunks[-1].usage.completion_tokens == MAX_NEW
        assert all(c.finish_reason is None for c in chunks[:-1])
        (alone, _, _), = serve_all(engine, [_req(9, prompt, {**sampling, "seed": seed + i})])
        assert seqs[i] == alone, i
    assert len({tuple(s) for s in seqs.values()}) > 1
    assert engine.stats().kv_blocks_used == 0


def test_n_sequences_with_penalties_see_the_whole_prompt(engine, hf_and_folder) -> None:
    """The later sequences never run the shared prompt tokens themselves: their repetition
    penalty must still cover them (greedy: every sequence equals transformers' output)."""
    model, _ = hf_and_folder
    # a prompt made of the model's own continuation, so penalizing it changes what comes next
    prompt = [20, 21, 22] + _greedy_with(model, [20, 21, 22], 10, lambda t, lg: lg)  # 13 tokens, 12 shared

    def penalized(seen_from: int):
        def rule(tokens, logits):
            return RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([tokens[seen_from:]]), logits[None].clone())[0]
        return rule

    want = _greedy_with(model, prompt, MAX_NEW, penalized(0))
    assert want != _greedy_with(model, prompt, MAX_NEW, penalized(12))  # the shared part of the prompt matters
    seqs = _by_index(_chunks(engine, _req(0, prompt, {"repetition_penalty": 1.8}, n=2, prompt_logprobs=True)))
    for i, chunks in seqs.items():
        assert [t for c in chunks for t in c.token_ids] == want, i
    assert seqs[0][0].prompt_logprobs is not None and seqs[1][0].prompt_logprobs is None  # the first one returns them
