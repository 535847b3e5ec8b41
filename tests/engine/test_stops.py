"""Stops: stop strings on streamed text (held back, cut, released), token-level stops,
and incremental detokenization of byte-level tokens (no broken characters in deltas)."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from server.engine.api import FinishReason, GenerationRequest, StopParams
from server.frontend.detokenizer import IncrementalDetokenizer
from server.core.sequence import Sequence
from server.core.stops import token_stop_reason
from server.frontend.stop_strings import StopStringMatcher


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, bool]:
    out = []
    for d in deltas:
        text, matched = matcher.feed(d)
        out.append(text)
        if matched:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


@pytest.mark.parametrize("deltas, stops, expected, matched", [
    (["Hello", " wor", "ld", "!"], ["world"], "Hello ", True),
    (["ab", "c", "d"], ["cd"], "ab", True),
    (["xx", "STO", "P yy"], ["STOP"], "xx", True),
    (["a", "b", "c"], ["abd"], "abc", False),  # held back "ab", released at the end
    (["one two"], ["two", "one"], "", True),  # earliest match wins
    (["no stop here"], [], "no stop here", False),
    (["aaab"], ["aab"], "a", True),
])
def test_stop_strings(deltas, stops, expected, matched) -> None:
    assert feed_all(StopStringMatcher(stops), deltas) == (expected, matched)


def test_held_back_text_is_only_a_possible_stop_prefix() -> None:
    m = StopStringMatcher(["</end>"])
    assert m.feed("hello </e") == ("hello ", False)
    assert m.feed("xtra") == ("</extra", False)
    assert m.feed("</en") == ("", False)
    assert m.flush() == "</en"


def make_seq(prompt_len: int, max_new: int, max_total: int, **stops) -> Sequence:
    req = GenerationRequest("r", tuple(range(prompt_len)), stops=StopParams(max_new_tokens=max_new, **stops))
    return Sequence.create(0, req, seed=0, max_total_len=max_total, now=0.0)


def test_token_stops() -> None:
    eos = frozenset({2})
    seq = make_seq(3, max_new=4, max_total=100, stop_token_ids=(9,))
    seq.token_ids.append(5)
    assert token_stop_reason(seq, 5, eos) is None
    seq.token_ids.append(2)
    assert token_stop_reason(seq, 2, eos) is FinishReason.STOP
    seq.token_ids.append(9)
    assert token_stop_reason(seq, 9, eos) is FinishReason.STOP
    seq.token_ids.append(5)  # 4th generated token
    assert token_stop_reason(seq, 5, eos) is FinishReason.LENGTH
    ignoring = make_seq(3, max_new=4, max_total=100, ignore_eos=True)
    ignoring.token_ids.append(2)
    assert token_stop_reason(ignoring, 2, eos) is None


def test_max_model_len_ends_with_length() -> None:
    seq = make_seq(3, max_new=100, max_total=5)
    seq.token_ids.append(7)
    assert token_stop_reason(seq, 7, frozenset()) is None
    seq.token_ids.append(7)
    assert token_stop_reason(seq, 7, frozenset()) is FinishReason.LENGTH


@pytest.fixture(scope="module")
def byte_level_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["héllo wörld 日本語 emoji 😀 test", "stop here please, naïve café"], trainer)
    return tok


def test_incremental_detokenizer_never_emits_broken_characters(byte_level_tokenizer) -> None:
    tok = byte_level_tokenizer
    decode = lambda ids: tok.decode(ids)  # noqa: E731
    text = "日本語 😀 héllo wörld, naïve café 😀😀"
    ids = tok.encode(text).ids
    prompt = tok.encode("emoji ").ids
    detok = IncrementalDetokenizer(decode, prompt)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas)  # some characters did span tokens


def test_incremental_detokenizer_releases_an_incomplete_tail_at_the_end(byte_level_tokenizer) -> None:
    tok = byte_level_tokenizer
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 30))]
        detok = IncrementalDetokenizer(tok.decode, [])
        out = "".join(detok.add(i) for i in ids) + detok.flush()
        assert out == tok.decode(ids)
