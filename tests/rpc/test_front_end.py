"""The front end across the process boundary (embedded model, CPU, real server processes).

* 128 concurrent greedy streams get exactly the tokens and text the same prompts get one at a
  time, at stream_interval 1 and 5; with 5, every message between the first and the last
  carries at least 5 tokens;
* half of 256 streams cancelled at seeded random points leave no sequence, queue entry, KV
  block or call behind;
* huge text prompts and messages of millions of unknown fields do not stall health checks or
  a stream in flight;
* one connection that stops reading cannot take every call slot: it is capped per connection,
  and its stalled streams are cancelled after server.stalled_stream_timeout_s (slots and
  sequences freed) while everyone else is served;
* a client process killed while the server's writes to it are blocked: its calls count
  CANCELLED, never INTERNAL, and nothing is logged as a failure.
"""
from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import AsyncClient, Client, NO_RETRY, errors
from clients.pb import generation_pb2 as g
from clients.pb.service_pb2_grpc import GenerationServiceStub
from server.loadtest.session import run_session, wait_idle
from server.loadtest.workload import LoadSpec
from tests.helpers.server_process import ServerProcess

PROMPTS = [tuple(random.Random(i).randrange(1, 250) for _ in range(3 + i % 9)) for i in range(128)]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def server_interval_1(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("front-end-1"), "server.stream_interval=1") as srv:
        yield srv


@pytest.fixture(scope="module")
def server_interval_5(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("front-end-5"), "server.stream_interval=5") as srv:
        yield srv


async def _stream(client: AsyncClient, prompt) -> list:
    return [c async for c in client.stream(list(prompt), max_new_tokens=NEW_TOKENS, ignore_eos=True)]


@pytest.fixture(scope="module")
def alone(server_interval_1):
    """Every prompt served on its own, one after the other (the same model in every server)."""
    with Client(server_interval_1.target, timeout=120) as client:
        return [client.generate(list(p), max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in PROMPTS]


@pytest.mark.parametrize("interval", [1, 5])
def test_concurrent_greedy_streams_match_one_at_a_time(request, alone, interval):
    srv = request.getfixturevalue(f"server_interval_{interval}")

    async def together():
        async with AsyncClient(srv.target, retry=NO_RETRY, timeout=300) as client:
            return await asyncio.gather(*[_stream(client, p) for p in PROMPTS])

    for one, chunks in zip(alone, asyncio.run(together())):
        assert [t for c in chunks for t in c.token_ids] == list(one.token_ids)
        assert "".join(c.text for c in chunks) == one.text
        assert chunks[-1].usage.completion_tokens == NEW_TOKENS
        assert all(len(c.token_ids) >= interval for c in chunks[1:-1]), [len(c.token_ids) for c in chunks]
        assert chunks[0].token_ids  # the first token goes out in the first message


def test_cancelling_half_of_256_streams_leaves_nothing_behind(server_interval_5):
    spec = LoadSpec(streams=256, new_tokens=16, cancel_fraction=0.5, seed=5)

    async def storm():
        async with AsyncClient(server_interval_5.target, retry=NO_RETRY, timeout=300) as client:
            return await run_session(client, spec, runs=1, idle_timeout_s=15.0)

    report = asyncio.run(storm())
    assert report.ok, report.failures
    run = report.runs[0]
    assert sum(r.cancelled for r in run.result.streams) >= 64 and run.codes.get("CANCELLED")  # others ended first
    with Client(server_interval_5.target) as c:
        stats = c.server_info().stats
    assert (stats.running_sequences, stats.waiting_sequences, stats.kv_blocks_used, stats.active_calls) == (0, 0, 0, 0)


def test_huge_requests_do_not_stall_health_or_other_streams(server_interval_1):
    """3.5 MiB text prompts (over server.max_prompt_bytes), a 0.9 MiB one (tokenized, then too
    long) and 4 MB messages of 2M unknown fields arrive while a stream runs: health answers
    within 1 s throughout and the stream's messages keep coming less than 1 s apart."""
    target = server_interval_1.target
    flood = bytes([15 << 3, 0]) * 2_000_000 + g.GenerateRequest(token_ids=g.TokenIds(ids=[1])).SerializeToString()
    payloads = [g.GenerateRequest(text="hello world " * 300_000).SerializeToString()] * 3
    payloads += [g.GenerateRequest(text="hello world " * 78_000).SerializeToString(), flood, flood]

    async def scenario():
        async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            raw = ch.unary_unary("/epserve.v1.GenerationService/Generate", request_serializer=lambda b: b,
                                 response_deserializer=g.GenerateResponse.FromString)
            stream = GenerationServiceStub(ch).GenerateStream(
                g.GenerateRequest(token_ids=g.TokenIds(ids=[1, 2, 3]), max_new_tokens=2000, ignore_eos=True))
            await stream.read()
            gaps, probes, codes = [], [], []

            async def read_stream():
                last = time.perf_counter()
                while (await stream.read()) is not grpc.aio.EOF:
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            async def probe():
                for _ in range(40):
                    start = time.perf_counter()
                    await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                    probes.append(time.perf_counter() - start)
                    await asyncio.sleep(0.05)

            async def send(data):
                try:
                    await raw(data, timeout=60)
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)

            reader = asyncio.ensure_future(read_stream())
            await asyncio.gather(probe(), *[send(p) for p in payloads])
            stream.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            return gaps, probes, codes

    gaps, probes, codes = asyncio.run(scenario())
    assert codes.count("INVALID_ARGUMENT") == 4 and codes.count("OK") == 2, codes
    assert max(probes) < 1.0, max(probes)
    assert len(gaps) > 10 and max(gaps) < 1.0, (len(gaps), max(gaps))


def test_a_connection_that_stops_reading_cannot_lock_others_out(tmp_path):
    overrides = ["server.max_concurrent_streams=8", "server.max_calls_per_connection=4",
                 "server.stalled_stream_timeout_s=2"]
    with ServerProcess(tmp_path, *overrides) as srv:
        async def scenario():
            options = [("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0)]
            async with grpc.aio.insecure_channel(srv.target, options=options) as channel:
                stub = GenerationServiceStub(channel)
                def call(i: int):
                    return stub.GenerateStream(g.GenerateRequest(token_ids=g.TokenIds(ids=[7, 8, i]), max_new_tokens=2000,
                                                                 ignore_eos=True))

                calls = [call(i) for i in range(4)]
                for c in calls:  # held open, never read past the first message
                    await c.read()
                calls += [call(i) for i in range(4, 6)]
                refused = []
                for c in calls[4:]:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await c.read()
                    refused.append((err.value.code(), err.value.details()))
                async with AsyncClient(srv.target, retry=NO_RETRY, timeout=60) as other:
                    served = await other.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
                    idle_s, stats = await wait_idle(other, 30.0)  # the stalled streams are cancelled
                return refused, served, idle_s, stats, None

        refused, served, idle_s, stats, held = asyncio.run(scenario())
        assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_calls_per_connection" in details
                   for code, details in refused), refused
        assert len(served.token_ids) == 4
        assert idle_s is not None, stats
        with Client(srv.target) as c:
            by_code = c.server_info().stats.requests_by_code
        assert by_code.get("CANCELLED", 0) >= 4 and "INTERNAL" not in by_code, by_code
        assert "stopped reading" in srv.log()


def test_streams_that_stop_reading_give_way_when_the_server_is_full(tmp_path):
    """Two connections fill every slot with streams they never read (the per-connection limit
    cannot stop a client that opens several). With the stall timeout at 60 s, another client
    is still served within seconds: on a full server the stream whose write has waited longest
    gives its slot away (before: RESOURCE_EXHAUSTED for the whole 60 s, and again after)."""
    overrides = ["server.max_concurrent_streams=8", "server.max_calls_per_connection=4",
                 "server.stalled_stream_timeout_s=60"]
    with ServerProcess(tmp_path, *overrides) as srv:
        async def scenario():
            options = [("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0),
                       ("grpc.use_local_subchannel_pool", 1)]  # a connection of its own each
            channels = [grpc.aio.insecure_channel(srv.target, options=options) for _ in range(2)]
            calls = [GenerationServiceStub(ch).GenerateStream(g.GenerateRequest(
                token_ids=g.TokenIds(ids=[7, 8, i]), max_new_tokens=2000, ignore_eos=True))
                for i, ch in enumerate(channels * 4)]
            for c in calls:  # held open, never read past the first message
                await c.read()
            start, refused = time.monotonic(), 0
            async with AsyncClient(srv.target, retry=NO_RETRY, timeout=60) as other:
                while True:
                    try:
                        served = await other.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
                        break
                    except errors.ResourceExhaustedError:
                        refused += 1
                        assert time.monotonic() - start < 15, "a full server of stalled streams kept refusing"
                        await asyncio.sleep(0.2)
            took = time.monotonic() - start
            for ch in channels:
                await ch.close()
            return served, refused, took

        served, refused, took = asyncio.run(scenario())
        assert len(served.token_ids) == 4 and took < 15, took
        assert "to make room" in srv.log()
        with Client(srv.target) as c:
            by_code = c.server_info().stats.requests_by_code
        assert "INTERNAL" not in by_code, by_code
    print(f"served after {took:.1f}s ({refused} refusals first)")


VANISHING_CLIENT = """
import asyncio, sys, time
import grpc
from clients.pb import generation_pb2 as g
from clients.pb.service_pb2_grpc import GenerationServiceStub

async def main():
    options = [("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0)]
    channel = grpc.aio.insecure_channel(sys.argv[1], options=options)
    stub = GenerationServiceStub(channel)
    calls = [stub.GenerateStream(g.GenerateRequest(token_ids=g.TokenIds(ids=[5, i % 200 + 1]), max_new_tokens=1500,
                                                   ignore_eos=True)) for i in range(32)]
    for call in calls:
        await call.read()
    print("streaming", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_killed_client_counts_cancelled_not_internal(server_interval_1):
    import subprocess
    import sys

    from tests.helpers.server_process import ROOT

    target = server_interval_1.target
    with Client(target) as c:
        before = c.server_info().stats.requests_by_code
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, target], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout.readline().strip() == "streaming"
            time.sleep(1.0)  # the server's writes to it pile up behind a closed window
        finally:
            proc.kill()
            proc.wait(10)
    with Client(target) as c:
        idle_s, _ = asyncio.run(_idle(target))
        after = c.server_info().stats.requests_by_code
    moved = {code: n - before.get(code, 0) for code, n in after.items() if n != before.get(code, 0)}
    assert idle_s is not None and moved == {"CANCELLED": 96}, moved
    log = server_interval_1.log()
    assert "failed unexpectedly" not in log and "Traceback" not in log


async def _idle(target: str):
    async with AsyncClient(target, retry=NO_RETRY) as client:
        return await wait_idle(client, 30.0)
