"""The front end's input batch: an item msgpack cannot pack is handed back to be refused, the
rest still go out, and nothing stays queued. Through the real engine-core process: a switch
that cannot be packed is refused at once and the next generation is served (such a switch
once stayed queued and made every later call time out)."""
from __future__ import annotations

import asyncio

import pytest

from server.frontend.input_batch import InputBatch
from server.core.messages import AddRequest, InputFrame, SwitchCall, decode


def test_an_unpackable_item_is_left_out_and_never_stays_queued() -> None:
    batch = InputBatch()
    batch.adds.append(AddRequest(7, [1, 2], 0.0, 1.0, 0, 0, 4, [], True, False, 0))
    batch.switches.append(SwitchCall(11, {"name": "uniform_random", "seed": 2**64}))
    batch.switches.append(SwitchCall(12, {"name": "natural"}))
    batch.aborts.append(3)
    frame, left_out = batch.take_frame(0)
    assert not batch
    assert [(u.kind, u.item_id) for u in left_out] == [("switch", 11)] and "engine core" in left_out[0].reason
    sent = decode(frame)
    assert isinstance(sent, InputFrame) and [a.req_id for a in sent.adds] == [7] and sent.aborts == [3]
    assert sent.switches == [SwitchCall(12, {"name": "natural"})]
    batch.switches.append(SwitchCall(13, {"seed": -(2**70)}))
    frame, left_out = batch.take_frame(1)  # nothing packable: no frame at all
    assert frame is None and [u.item_id for u in left_out] == [13] and not batch


def test_the_engine_process_refuses_an_unpackable_switch_and_serves_on() -> None:
    from server.config import AppConfig
    from server.engine.api import GenerationRequest, InvalidPolicyError, SamplingParams, StopParams
    from server.frontend.start import start_engine

    async def scenario() -> list[int]:
        engine = await asyncio.to_thread(start_engine, AppConfig.from_dict({"server": {"allow_routing_switch": True}}))
        try:
            with pytest.raises(InvalidPolicyError, match="engine core"):
                await asyncio.wait_for(engine.set_routing_policy({"name": "uniform_random", "seed": 2**64}), 10)
            request = GenerationRequest(request_id="after", prompt_token_ids=(1, 2, 3),
                                        sampling=SamplingParams(temperature=0.0),
                                        stops=StopParams(max_new_tokens=3, ignore_eos=True))

            async def tokens() -> list[int]:
                out = []
                async for chunk in engine.generate(request):
                    out.extend(chunk.token_ids)
                return out

            return await asyncio.wait_for(tokens(), 30)
        finally:
            await asyncio.to_thread(engine.shutdown)

    assert len(asyncio.run(scenario())) == 3
