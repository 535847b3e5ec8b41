"""The sampling fields through a real `python -m server` subprocess (embedded tiny model, CPU),
driven with the generated gRPC stub; the oracle is transformers on the same checkpoint."""
from __future__ import annotations

import grpc
import pytest
import torch

from clients.pb import generation_pb2 as g
from clients.pb import service_pb2_grpc
from tests.helpers.server_process import ServerProcess

PROMPT = [17, 230, 5, 99, 41, 8, 200, 12]


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("server")) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            yield service_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    from server.model.loader import TINY_MODEL_DIR

    return AutoModelForCausalLM.from_pretrained(str(TINY_MODEL_DIR), attn_implementation="eager").eval()


def _request(**fields) -> g.GenerateRequest:
    sampling = fields.pop("sampling", {})
    return g.GenerateRequest(token_ids=g.TokenIds(ids=PROMPT), max_new_tokens=6, ignore_eos=True,
                             sampling=g.SamplingParams(**sampling), **fields)


def test_penalties_top_and_prompt_logprobs_over_grpc(stub, hf) -> None:
    reply = stub.Generate(_request(sampling=dict(repetition_penalty=1.6), top_logprobs=3, prompt_logprobs=True),
                          timeout=60)
    tokens = list(reply.token_ids)
    with torch.no_grad():
        want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, repetition_penalty=1.6)
        logits = hf(torch.tensor([PROMPT + tokens])).logits[0].float().log_softmax(-1)  # [P + n, V]
    assert tokens == want[0, len(PROMPT):].tolist()
    assert len(reply.logprobs) == len(reply.top_logprobs) == 6  # top_logprobs implies logprobs
    ref_lp, ref_ids = logits[len(PROMPT) - 1:-1].topk(3, dim=-1)
    for i, top in enumerate(reply.top_logprobs):
        assert list(top.token_ids) == ref_ids[i].tolist()
        torch.testing.assert_close(torch.tensor(list(top.logprobs)), ref_lp[i], rtol=0, atol=1e-4)
    prompt_ref = logits[:len(PROMPT) - 1].gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(list(reply.prompt_logprobs)), prompt_ref, rtol=0, atol=1e-4)
    assert len(reply.prompt_top_logprobs) == len(PROMPT) - 1  # with top_logprobs: the prompt positions' top 3
    ref_lp, ref_ids = logits[:len(PROMPT) - 1].topk(3, dim=-1)
    assert [list(top.token_ids) for top in reply.prompt_top_logprobs] == ref_ids.tolist()
    got = torch.tensor([list(top.logprobs) for top in reply.prompt_top_logprobs])
    torch.testing.assert_close(got, ref_lp, rtol=0, atol=1e-4)


def test_stream_sends_prompt_logprobs_once_and_min_tokens(stub) -> None:
    first = stub.Generate(_request(), timeout=60).token_ids[0]
    alone = stub.Generate(_request(stop_token_ids=[first]), timeout=60)
    assert list(alone.token_ids) == [first] and alone.finish_reason == g.FINISH_REASON_STOP
    messages = list(stub.GenerateStream(_request(prompt_logprobs=True, min_tokens=4, stop_token_ids=[first]),
                                        timeout=60))
    with_prompt = [m for m in messages if len(m.prompt_logprobs)]
    assert len(with_prompt) == 1 and len(with_prompt[0].prompt_logprobs) == len(PROMPT) - 1
    tokens = [t for m in messages for t in m.token_ids]
    assert len(tokens) >= 4 and first not in tokens[:4]


@pytest.mark.parametrize("field, sampling, extra", [
    ("sampling.min_p", dict(temperature=1.0, min_p=2.0), {}),
    ("sampling.repetition_penalty", dict(repetition_penalty=0.0), {}),
    ("sampling.presence_penalty", dict(presence_penalty=-9.0), {}),
    ("top_logprobs", {}, dict(top_logprobs=50)),
    ("min_tokens", {}, dict(min_tokens=7)),
])
def test_bad_values_are_invalid_argument_and_the_server_keeps_serving(stub, field, sampling, extra) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_request(sampling=sampling, **extra), timeout=60)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    assert len(stub.Generate(_request(), timeout=60).token_ids) == 6


def test_n_sequences_stream_interleaved_and_unary_choices(stub) -> None:
    request = _request(sampling=dict(temperature=1.0, seed=5), n=3)
    messages = list(stub.GenerateStream(request, timeout=60))
    by_index: dict[int, list] = {}
    for m in messages:
        by_index.setdefault(m.index, []).append(m)
    assert sorted(by_index) == [0, 1, 2]
    for msgs in by_index.values():
        assert msgs[-1].finish_reason == g.FINISH_REASON_LENGTH and msgs[-1].usage.completion_tokens == 6
        assert all(m.finish_reason == g.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    streamed = [[t for m in by_index[i] for t in m.token_ids] for i in range(3)]
    reply = stub.Generate(request, timeout=60)
    assert [c.index for c in reply.choices] == [0, 1, 2] and not reply.token_ids
    assert [list(c.token_ids) for c in reply.choices] == streamed  # seeded: the same set again
    for i in range(3):  # each sequence is the request alone under seed + i
        alone = stub.Generate(_request(sampling=dict(temperature=1.0, seed=5 + i)), timeout=60)
        assert list(alone.token_ids) == streamed[i]
