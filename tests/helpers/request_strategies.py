"""Hypothesis strategies for GenerateRequests: mostly plausible, often out of range, as the
fuzz tests need (values near every boundary the server checks)."""
from __future__ import annotations

from hypothesis import strategies as st

from clients.pb import generation_pb2 as g

U32 = 2**32 - 1
_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0.0, -0.0, 1.0, 1e-9, 1.0000001, -1.0, 2.0]))


def generate_requests(vocab_size: int, max_model_len: int) -> st.SearchStrategy[bytes]:
    token = st.one_of(st.integers(0, vocab_size - 1), st.integers(0, U32))
    short = st.lists(token, min_size=0, max_size=8)
    near_limit = st.integers(max_model_len - 2, max_model_len + 2).map(lambda n: [1] * n)  # cheap to draw
    prompt_ids = st.one_of(short, short, short, near_limit)
    text = st.text(max_size=40)

    @st.composite
    def build(draw) -> bytes:
        req = g.GenerateRequest()
        kind = draw(st.sampled_from(["text", "ids", "none", "both"]))
        if kind in ("text", "both"):
            req.text = draw(text)
        if kind == "ids":
            req.token_ids.ids.extend(draw(prompt_ids))
            req.token_ids.SetInParent()
        if draw(st.integers(0, 4)):  # mostly set: an unset one means 16 new tokens, slower to serve
            req.max_new_tokens = draw(st.one_of(st.integers(0, 4), st.integers(0, U32)))
        if draw(st.booleans()):
            s = req.sampling
            s.temperature = draw(_floats)
            if draw(st.booleans()):
                s.top_p = draw(_floats)
            s.top_k = draw(st.integers(-(2**31), 2**31 - 1) | st.integers(-2, vocab_size + 2))
            if draw(st.booleans()):
                s.seed = draw(st.integers(0, 2**64 - 1))
        req.stop.extend(draw(st.lists(st.text(max_size=300), max_size=18)))
        req.stop_token_ids.extend(draw(st.lists(token, max_size=66)))
        req.ignore_eos = draw(st.booleans())
        req.logprobs = draw(st.booleans())
        req.request_id = draw(st.text(max_size=130))
        req.output_format = draw(st.integers(0, 4) | st.integers(-(2**31), 2**31 - 1))
        data = req.SerializeToString()
        if kind == "both":
            data += g.GenerateRequest(token_ids=g.TokenIds(ids=[1])).SerializeToString()
        return data

    return build() | st.binary(max_size=64)  # and some arbitrary bytes
