"""The pipes' messages: every type round-trips through the one codec, nested messages included,
a request crosses as the same EngineRequest, and a value no message may carry is refused."""
from __future__ import annotations

import pytest

from server.engine.api import EngineStats, FinishReason, RoutedExpertsMode, SamplingParams, StopParams
from server.core.step_io import EngineRequest, StepOutputs
from server.core.messages import (
    MESSAGE_TYPES, AddRequest, Failed, Heartbeat, InputFrame, LoadCall, Ready, Rejected, RoutingReply, Shutdown,
    StartFailed, Stats, StepFrame, SwitchCall, decode, encode,
)
from server.moe.load_stats import ExpertLoadSnapshot

STATS = EngineStats(running=2, waiting=1, kv_blocks_used=7, kv_blocks_total=64, steps=12)


def test_a_request_crosses_as_the_same_engine_request() -> None:
    req = EngineRequest(5, (1, 2, 3), SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=2**63 - 1),
                        StopParams(max_new_tokens=9, stop=("ignored",), stop_token_ids=(4, 8), ignore_eos=True),
                        logprobs=True, routed_experts=RoutedExpertsMode.WITH_PROMPT)
    frame = decode(encode(InputFrame(3, adds=[AddRequest.of(req)], aborts=[1, 2], loads=[LoadCall(9, True)],
                                     switches=[SwitchCall(10, {"name": "skewed", "target": 2.5})])))
    assert isinstance(frame, InputFrame) and frame.number == 3
    got = frame.adds[0].request()
    assert got == EngineRequest(5, (1, 2, 3), req.sampling, StopParams(max_new_tokens=9, stop_token_ids=(4, 8),
                                                                      ignore_eos=True), True, RoutedExpertsMode.WITH_PROMPT)
    assert frame.aborts == [1, 2] and frame.loads == [LoadCall(9, True)]
    assert frame.switches == [SwitchCall(10, {"name": "skewed", "target": 2.5})]


def test_a_step_crosses_with_its_stats_finish_reasons_and_load() -> None:
    load = ExpertLoadSnapshot(expert_tokens=[[3, 1]], tokens=[2], ranks_touched=[2], ep_size=1)
    out = StepOutputs(req_ids=[4, 6], token_ids=[[11], [12]], logprobs=[None, [-0.5]],
                      finished={6: FinishReason.LENGTH}, expert_load=load, load_tickets=[1], routed=[None, b"\x01\x00"])
    step = decode(encode(StepFrame.of(out, STATS, [77])))
    assert (step.req_ids, step.token_ids, step.logprobs, step.routed) == (out.req_ids, out.token_ids, out.logprobs, out.routed)
    assert step.stats == STATS and step.finish_reason(6) is FinishReason.LENGTH and step.finish_reason(4) is None
    assert step.load.call_ids == [77] and step.load.snapshot == load


@pytest.mark.parametrize("message", [
    Shutdown(), Heartbeat(), Failed("EP rank 1 exited"), StartFailed("config", "parallel.ep_size=3"),
    Stats(STATS, 4), Rejected(3, "exhausted", "engine.max_queue"), RoutingReply([1, 2], False, "no such policy"),
    RoutingReply([3], True, b"\x80pickled"),
], ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message) -> None:
    assert decode(encode(message)) == message


def test_ready_carries_the_model_info_and_policy() -> None:
    info, routing = {"eos": (2,)}, ("greedy_balanced", {"seed": 1})
    assert decode(encode(Ready.of(info, routing))).unpacked() == (info, routing)


def test_every_type_has_one_code_and_anything_else_is_refused() -> None:
    assert len(set(MESSAGE_TYPES.values())) == len(MESSAGE_TYPES)
    with pytest.raises(TypeError, match="not a message"):
        encode(Failed(reason=object()))
    with pytest.raises(OverflowError):
        encode(LoadCall(2**64, False))
