"""Overlapped scheduling (engine.overlap) changes no token: the same concurrent requests —
mixed prompt lengths, greedy and seeded sampling, chunked prefill, queueing, stops in the
middle of a step in flight, cancellations — give the same streams with overlap on and off,
and a finished or cancelled sequence never emits a token from a step planned before it ended."""
from __future__ import annotations

import asyncio

import pytest

from server.config import AppConfig
from server.engine.api import FinishReason, GenerationRequest, SamplingParams, StopParams
from server.frontend.start import start_engine

PROMPTS = [list(b"Hello, world"), list(b"MoE"), list(b"The quick brown fox jumps"), [7], list(b"expert parallel!"),
           list(b"abc" * 9), list(b"serving"), list(b"z")]


def app(overlap: bool, ep_size: int = 1) -> AppConfig:
    return AppConfig.from_dict({"parallel": {"ep_size": ep_size},
                                "engine": {"max_num_seqs": 4, "kv_cache_tokens": 1024, "kv_block_size": 4,
                                           "max_num_batched_tokens": 16, "max_queue": 64, "overlap": overlap}})


def requests(stop_tokens: dict[int, int] | None = None) -> list[GenerationRequest]:
    stop_tokens = stop_tokens or {}
    out = []
    for i in range(12):
        sampling = SamplingParams(temperature=0.0) if i % 3 == 0 else SamplingParams(temperature=0.9, top_k=40, seed=100 + i)
        stops = StopParams(max_new_tokens=4 + (i * 5) % 11, ignore_eos=True,
                           stop_token_ids=(stop_tokens[i],) if i in stop_tokens else ())
        out.append(GenerationRequest(f"r{i}", tuple(PROMPTS[i % len(PROMPTS)]), sampling, stops, logprobs=i % 4 == 1))
    return out


async def _collect(eng, req, cancel_after: int | None = None):
    tokens, logprobs, last = [], [], None
    gen = eng.generate(req)
    try:
        async for chunk in gen:
            tokens += chunk.token_ids
            logprobs += chunk.logprobs or ()
            last = chunk
            if cancel_after is not None and len(tokens) >= cancel_after:
                break
    finally:
        await gen.aclose()
    return tokens, logprobs, last.finish_reason if last else None


def serve(eng, reqs, cancel_after: dict[int, int] | None = None):
    cancel_after = cancel_after or {}

    async def main():
        return await asyncio.gather(*[_collect(eng, r, cancel_after.get(i)) for i, r in enumerate(reqs)])
    return asyncio.run(main())


def record_updates_and_finishes(scheduler, monkeypatch) -> list:
    """Log, in order, each step's sequences that got a token and each sequence that ended
    (finished or aborted). Both run under the core's lock, so the order is the real one."""
    log: list = []
    update, finish = scheduler.update, scheduler.finish

    def logged_update(plan, results):
        out = update(plan, results)
        log.append(("tokens", [seq.seq_id for seq, _, _ in out]))
        return out

    def logged_finish(seq):
        finish(seq)
        log.append(("finish", [seq.seq_id]))

    monkeypatch.setattr(scheduler, "update", logged_update)
    monkeypatch.setattr(scheduler, "finish", logged_finish)
    return log


@pytest.fixture(scope="module")
def engines():
    on, off = start_engine(app(True), in_thread=True), start_engine(app(False), in_thread=True)
    yield on, off
    on.shutdown()
    off.shutdown()


def test_overlap_gives_the_same_streams_with_stops_and_cancels_in_flight(engines, monkeypatch) -> None:
    on, off = engines
    base = serve(off, requests())
    # Stop four requests on a token they produce mid-way (it is known from the run above), and
    # cancel three others after a few tokens: both happen while the next step is in flight.
    stops = {i: base[i][0][2] for i in (1, 4, 7, 10) if len(base[i][0]) > 3}
    assert len(stops) >= 3
    cancels = {2: 2, 5: 1, 9: 3}
    results = {}
    for name, eng in (("off", off), ("on", on)):
        log = record_updates_and_finishes(eng.core.scheduler, monkeypatch)
        results[name] = serve(eng, requests(stops), cancels)
        ended: set[int] = set()
        for kind, ids in log:  # in lock order: no token for a sequence after it ended
            if kind == "finish":
                ended.update(ids)
            else:
                assert not ended & set(ids), f"{name}: tokens for ended sequences {sorted(ended & set(ids))}"
        stats = eng.stats()
        assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0)
    for i, ((tokens, lps, reason), (tokens_off, lps_off, reason_off)) in enumerate(zip(results["on"], results["off"])):
        if i in cancels:  # a chunk may carry more tokens than asked for: compare what was asked
            assert tokens[:cancels[i]] == tokens_off[:cancels[i]] == base[i][0][:cancels[i]]
            continue
        assert (tokens, reason) == (tokens_off, reason_off)
        assert lps == pytest.approx(lps_off, abs=1e-4) and len(lps) == (len(tokens) if i % 4 == 1 else 0)
        if i in stops:
            assert reason is FinishReason.STOP and tokens[-1] == stops[i] and tokens == base[i][0][:len(tokens)]
        else:
            assert reason is FinishReason.LENGTH and tokens == base[i][0]


def test_overlap_counts_each_planned_forward_step_once(engines) -> None:
    on, _ = engines
    asyncio.run(on.expert_load(reset=True))
    (tokens, _, _), = serve(on, [GenerationRequest("x", tuple(PROMPTS[0]), SamplingParams(temperature=0.0),
                                                   StopParams(max_new_tokens=6, ignore_eos=True))])
    snap = asyncio.run(on.expert_load(reset=True))
    assert len(tokens) == 6
    assert snap.tokens == [len(PROMPTS[0]) + 6 - 1] * len(snap.tokens)  # no wasted row: the length was known


def test_ep2_overlap_matches_one_step_at_a_time() -> None:
    on, off = start_engine(app(True, ep_size=2), in_thread=True), None
    try:
        got = serve(on, requests())
    finally:
        on.shutdown()
    off = start_engine(app(False), in_thread=True)
    try:
        want = serve(off, requests())
    finally:
        off.shutdown()
    assert [r[0] for r in got] == [r[0] for r in want]
