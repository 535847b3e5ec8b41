"""The sampler's logit processors against transformers' and plain-torch references (CPU).

Penalties are recorded the way a rank does it (a step's input tokens, split by the prompt
length), then applied to random logits; the reference sees the same tokens as input_ids.
"""
from __future__ import annotations

import torch
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor)

from server.worker.penalties import PenaltyParams, PenaltyState
from server.worker.sampler import SamplingBatch, ban_tokens, min_p_mask, sample

V = 50


def _record(state: PenaltyState, seqs: list[tuple[int, list[int], int]]) -> None:
    """seqs: (slot, tokens from position 0, prompt length), all as one step's input."""
    ids = torch.tensor([t for _, toks, _ in seqs for t in toks])
    positions = torch.tensor([p for _, toks, _ in seqs for p in range(len(toks))])
    cu = torch.tensor([0] + [len(toks) for _, toks, _ in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    state.record(ids, positions, cu, torch.tensor([s for s, _, _ in seqs]), torch.tensor([p for _, _, p in seqs]))


def _openai_reference(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's documented rule, token by token: logit -= count * frequency + (count > 0) * presence."""
    out = logits.clone()
    for tok in set(generated):
        count = generated.count(tok)
        out[tok] -= count * frequency + presence
    return out


def test_repetition_penalty_equals_transformers() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g) * 3
    seqs = [(4, [1, 2, 2, 7, 9, 1], 3), (0, [30, 31], 2), (2, [5, 5, 5, 49, 0], 1)]
    state = PenaltyState(6, V, torch.device("cpu"))
    state.clear(torch.tensor([4, 0, 2]))
    _record(state, seqs)
    penalties = torch.tensor([1.3, 0.7, 2.0])
    params = PenaltyParams(torch.tensor([4, 0, 2]), penalties, torch.zeros(3), torch.zeros(3))
    got = state.apply(logits, params)
    for i, (_, toks, _) in enumerate(seqs):
        want = RepetitionPenaltyLogitsProcessor(float(penalties[i]))(torch.tensor([toks]), logits[i:i + 1].clone())
        torch.testing.assert_close(got[i:i + 1], want, rtol=0, atol=1e-6)


def test_presence_and_frequency_count_generated_tokens_only() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, V, generator=g)
    seqs = [(1, [3, 4, 3, 8, 8, 8, 3], 2), (3, [10, 11, 12, 10], 4)]  # slot 3: all prompt, nothing generated
    state = PenaltyState(4, V, torch.device("cpu"))
    _record(state, seqs)
    params = PenaltyParams(torch.tensor([1, 3]), torch.ones(2), torch.tensor([0.5, 1.5]), torch.tensor([0.25, -1.0]))
    got = state.apply(logits, params)
    torch.testing.assert_close(got[0], _openai_reference(logits[0], [3, 8, 8, 8, 3], 0.5, 0.25), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1], logits[1], rtol=0, atol=0)


def test_counts_accumulate_over_steps_and_clear_on_refill() -> None:
    state = PenaltyState(2, V, torch.device("cpu"))
    _record(state, [(0, [1, 2, 3], 3)])  # the prompt
    for pos, tok in [(3, 7), (4, 7), (5, 2)]:  # decode steps: one input token each, past the prompt
        state.record(torch.tensor([tok]), torch.tensor([pos]), torch.tensor([0, 1], dtype=torch.int32),
                     torch.tensor([0]), torch.tensor([3]))
    assert state.generated[0, 7] == 2 and state.generated[0, 2] == 1 and state.in_prompt[0, 2] == 1
    state.clear(torch.tensor([0]))
    assert not state.generated.any() and not state.in_prompt.any()


def test_min_p_equals_transformers_and_torch_reference() -> None:
    g = torch.Generator().manual_seed(2)
    scaled = torch.randn(4, V, generator=g) * 2
    min_p = torch.tensor([0.0, 0.05, 0.3, 1.0])
    got = min_p_mask(scaled, min_p)
    probs = scaled.softmax(-1)
    want_keep = probs >= min_p[:, None] * probs.max(-1, keepdim=True).values  # plain torch
    assert torch.equal(torch.isfinite(got), want_keep)
    for i in range(1, 4):  # transformers keeps at least one token, as we do (the best is never cut)
        hf = MinPLogitsWarper(float(min_p[i]))(torch.zeros(1, 1, dtype=torch.long), scaled[i:i + 1].clone())
        assert torch.equal(torch.isfinite(got[i:i + 1]), torch.isfinite(hf))


def test_ban_equals_transformers_min_new_tokens() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, V, generator=g)
    eos = [7, 11]
    banned = torch.tensor([eos + [eos[0]] * 3, eos + [eos[0]] * 3])  # padded by repeating the first id
    got = ban_tokens(logits, banned, torch.tensor([True, False]))
    hf = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=2, min_new_tokens=3, eos_token_id=eos)
    torch.testing.assert_close(got[0:1], hf(torch.zeros(1, 3, dtype=torch.long), logits[0:1].clone()))
    torch.testing.assert_close(got[1], logits[1])  # a row past its min_tokens is untouched


def test_sample_applies_penalty_and_ban_but_reports_raw_logprobs() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0], [1.0, 3.0, 2.9, 0.0]])
    state = PenaltyState(2, 4, torch.device("cpu"))
    _record(state, [(0, [1, 0], 1)])  # slot 0: prompt [1], then generated token 0 once
    params = PenaltyParams(torch.tensor([0, 1]), torch.ones(2), torch.tensor([2.0, 0.0]), torch.zeros(2))
    batch = SamplingBatch(temperature=torch.zeros(2), top_p=torch.ones(2), top_k=torch.zeros(2, dtype=torch.int64),
                          keys=torch.zeros(2, dtype=torch.int64), want_logprobs=True, all_greedy=True, any_cut=False,
                          penalties=(state, params), banned=torch.tensor([[1, 1], [1, 1]]),
                          ban_rows=torch.tensor([False, True]))
    tokens, logprobs = sample(logits, batch)
    assert tokens.tolist() == [1, 2]  # row 0: token 0 loses 2.0 to presence; row 1: token 1 is banned
    want = logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, want)
