"""Log-probabilities in OpenAI's two shapes: legacy completions and chat.

Completions (`logprobs: N`): parallel lists tokens / token_logprobs / top_logprobs / text_offset,
each top_logprobs entry a {token text: logprob} dict of the N best plus the sampled token (as
OpenAI and vLLM answer: up to N + 1 entries), null when N is 0. With echo the prompt's tokens
come first, the first with logprob and top_logprobs null: nothing precedes it to score it by.
lm-eval's local-completions backend reads exactly this (the sum of token_logprobs over the
continuation, and whether each equals the best of its top_logprobs).

Chat (`logprobs: true, top_logprobs: N`): a content list of {token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}, ...N]}.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

Alternatives = Sequence[tuple[int, float]]  # (token id, logprob), best first


@dataclass(frozen=True)
class Scored:
    token: int
    logprob: float | None  # None: the prompt's first token
    top: Alternatives | None = None  # None where no top-N was asked (or the prompt's first token)


def generated(token_ids: Sequence[int], logprobs: Sequence[float], tops: Sequence[Alternatives] | None
              ) -> list[Scored]:
    return [Scored(t, lp, tops[i] if tops is not None and i < len(tops) else None)
            for i, (t, lp) in enumerate(zip(token_ids, logprobs))]


def prompt(prompt_ids: Sequence[int], logprobs: Sequence[float], tops: Sequence[Alternatives] | None
           ) -> list[Scored]:
    """The prompt's tokens as echo shows them: the first unscored, then one logprob each."""
    return [Scored(prompt_ids[0], None)] + generated(prompt_ids[1:], logprobs, tops)


class LogprobShapes:
    """Builds one response's logprobs objects; token texts decoded once per response."""

    def __init__(self, chat: bool, top_n: int, decode_token: Callable[[int], str]) -> None:
        self.chat, self.top_n, self._decode = chat, top_n, decode_token
        self._texts: dict[int, str] = {}

    def text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self._decode(token)
        return text

    def build(self, scored: list[Scored], offset: int = 0) -> dict[str, Any]:
        """`offset`: where the first token's text starts in the choice's text (completions)."""
        return self._chat(scored) if self.chat else self._completion(scored, offset)

    def _completion(self, scored: list[Scored], offset: int) -> dict[str, Any]:
        tokens = [self.text(s.token) for s in scored]
        offsets, at = [], offset
        for text in tokens:
            offsets.append(at)
            at += len(text)
        top = None
        if self.top_n:
            top = [None if s.logprob is None else self._top_dict(s) for s in scored]
        return {"tokens": tokens, "token_logprobs": [s.logprob for s in scored], "top_logprobs": top,
                "text_offset": offsets}

    def _top_dict(self, s: Scored) -> dict[str, float]:
        out = {}
        for token, logprob in s.top or ():
            out.setdefault(self.text(token), logprob)
        out.setdefault(self.text(s.token), s.logprob)  # the sampled token, even when not among the best
        return out

    def _chat(self, scored: list[Scored]) -> dict[str, Any]:
        return {"content": [{**self._entry(s.token, s.logprob),
                             "top_logprobs": [self._entry(t, lp) for t, lp in (s.top or ())]}
                            for s in scored]}

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
