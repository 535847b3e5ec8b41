"""Every RPC of a real `python -m server` subprocess on loopback (embedded model, CPU).

One server for the module, with small engine limits so that they can be hit:
engine.max_num_seqs=1 and engine.max_queue=1 (RESOURCE_EXHAUSTED from the engine's queue).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients import Client, FinishReason, errors
from clients.pb import generation_pb2 as g
from tests.helpers.bad_requests import BAD_REQUESTS, Limits, good
from tests.helpers.process_sockets import listening_addresses
from tests.helpers.server_process import ROOT, ServerProcess

LONG = 2000  # more new tokens than any test waits for (the default max_model_len is 2048)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("server"), "engine.max_num_seqs=1", "engine.max_queue=1",
                       metrics=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.info()


def wait_idle(client: Client, timeout: float = 5.0):
    """Poll until the engine runs nothing and holds no KV blocks; returns the last stats."""
    end = time.monotonic() + timeout
    while True:
        stats = client.server_info().stats
        if (stats.running_sequences, stats.waiting_sequences, stats.kv_blocks_used, stats.active_calls) == (0, 0, 0, 0):
            return stats
        if time.monotonic() > end:
            raise AssertionError(f"engine not idle after {timeout}s: {stats}")
        time.sleep(0.05)


def test_generate_unary(client):
    out = client.generate("The quick brown fox", max_new_tokens=6, ignore_eos=True)
    assert len(out.token_ids) == 6 and out.finish_reason is FinishReason.LENGTH
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens > 0
    assert 0 <= out.usage.time_to_first_token_s <= out.usage.total_time_s
    assert out.request_id


def test_stream_matches_unary_and_ends_with_usage(client):
    prompt = [5, 6, 7, 8]
    unary = client.generate(prompt, max_new_tokens=8, ignore_eos=True)
    with client.stream(prompt, max_new_tokens=8, ignore_eos=True, request_id="stream-1") as stream:
        chunks = list(stream)
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason is FinishReason.LENGTH and last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == 4 and last.request_id == "stream-1"
    assert stream.completion.token_ids == unary.token_ids


def test_logprobs_and_token_ids_only(client):
    out = client.generate([1, 2, 3], max_new_tokens=5, ignore_eos=True, logprobs=True, text_output=False)
    assert len(out.logprobs) == len(out.token_ids) == 5
    assert all(lp <= 0.0 for lp in out.logprobs) and out.text == ""


def test_stop_token_id_ends_generation(client):
    free = client.generate([9, 10, 11], max_new_tokens=8, ignore_eos=True)
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = client.generate([9, 10, 11], max_new_tokens=8, ignore_eos=True, stop_token_ids=[stop_at])
    assert out.finish_reason is FinishReason.STOP and out.token_ids == free.token_ids[:first + 1]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(max_new_tokens=8, ignore_eos=True, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    assert client.generate([3, 4], **kw).token_ids == client.generate([3, 4], **kw).token_ids


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 4e-6])
def test_tiny_temperatures_and_top_k_1_are_greedy(client, temperature):
    """Below the documented floor (1e-5) a temperature is greedy, and top_k=1 is greedy at
    any temperature: the same tokens as temperature 0, whatever the seed."""
    prompt = "def main():\n    "
    greedy = client.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
    for seed in (1, 2):
        tiny = client.generate(prompt, max_new_tokens=12, ignore_eos=True, temperature=temperature, seed=seed)
        assert tiny.token_ids == greedy
        top1 = client.generate(prompt, max_new_tokens=12, ignore_eos=True, temperature=temperature, top_k=1, seed=seed)
        assert top1.token_ids == greedy
    hot = client.generate(prompt, max_new_tokens=12, ignore_eos=True, temperature=5.0, top_k=1, seed=3)
    assert hot.token_ids == greedy


def test_model_info(client, model):
    assert model.num_experts > 1 and 1 <= model.top_k <= model.num_experts
    assert model.num_moe_layers >= 1 and model.vocab_size > 0 and model.max_model_len > 0
    assert model.ep_size == 1 and model.routing.name == "natural" and model.routing.guarantee
    assert isinstance(model.routing.params, dict) and model.architecture


def test_expert_load_counts_routed_tokens_and_resets(client, model):
    client.expert_load(reset=True)
    prompt = list(range(1, 13))
    client.generate(prompt, max_new_tokens=1)  # one prefill step: 12 tokens through every MoE layer
    load = client.expert_load(reset=True)
    assert load.reset and load.num_layers == model.num_moe_layers and load.num_experts == model.num_experts
    for layer in load.layers:
        assert layer.tokens == len(prompt)
        assert sum(layer.expert_tokens) == len(prompt) * model.top_k == sum(layer.rank_tokens)
        assert layer.expert_max_over_mean >= 1.0
    assert sum(load.rank_totals) == len(prompt) * model.top_k * model.num_moe_layers
    after = client.expert_load()
    assert all(sum(layer.expert_tokens) == 0 for layer in after.layers) and not after.reset


def test_server_info(server, client):
    info = client.server_info()
    assert info.state.value == "serving" and info.version and info.uptime_s > 0
    assert info.config["max_num_seqs"] == 1 and info.config["max_queue"] == 1
    assert not info.config["tls"] and not info.config["auth"] and info.config["address"] == server.target
    assert info.stats.requests_by_code.get("OK", 0) >= 1 and info.stats.completion_tokens > 0


def test_closing_a_stream_cancels_and_frees_its_sequence(client):
    with client.stream([1, 2, 3], max_new_tokens=LONG, ignore_eos=True) as stream:
        for i, _ in enumerate(stream):
            if i == 2:
                break
        assert client.server_info().stats.running_sequences == 1
    wait_idle(client)
    assert client.server_info().stats.requests_by_code.get("CANCELLED", 0) >= 1


def test_killed_client_process_frees_its_sequence(server, client):
    """A client that dies without closing its stream (SIGKILL): the connection drops and the
    server frees the sequence at once."""
    code = ("import sys, time; from clients import Client; "
            f"s = Client({server.target!r}).stream([1, 2, 3], max_new_tokens={LONG}, ignore_eos=True); "
            "next(s); print('streaming', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        assert client.server_info().stats.running_sequences == 1
    finally:
        proc.kill()
        proc.wait(10)
    wait_idle(client)


def test_deadline_exceeded_frees_its_sequence(client):
    with pytest.raises(errors.DeadlineExceededError):
        with client.stream([1, 2, 3], max_new_tokens=LONG, ignore_eos=True, timeout=0.5) as stream:
            for _ in stream:
                pass
    with pytest.raises(errors.DeadlineExceededError):
        client.generate([1, 2, 3], max_new_tokens=LONG, ignore_eos=True, timeout=0.5)
    wait_idle(client)


def wait_for(predicate, client: Client, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while not predicate(stats := client.server_info().stats):
        if time.monotonic() > end:
            raise AssertionError(f"timed out; last stats {stats}")
        time.sleep(0.05)


def test_full_engine_queue_gives_resource_exhausted(client):
    """engine.max_num_seqs=1, engine.max_queue=1: one running, one waiting, the third refused."""
    with client.stream([1, 2, 3], max_new_tokens=LONG, ignore_eos=True) as running:
        next(running)
        with client.stream([4, 5, 6], max_new_tokens=4, ignore_eos=True) as waiting:
            wait_for(lambda st: st.waiting_sequences == 1, client)
            with pytest.raises(errors.ResourceExhaustedError, match="queue is full"):
                client.generate([1, 2], max_new_tokens=2)
            running.close()  # frees the slot: the waiting request runs to the end
            tokens = [t for chunk in waiting for t in chunk.token_ids]  # a lagging reader may get merged messages
            assert len(tokens) == 4 and waiting.completion.finish_reason is FinishReason.LENGTH
    wait_idle(client)


def _raw_generate(server, payload: bytes, timeout: float = 30.0):
    """Send raw bytes as a GenerateRequest (to craft what the client library cannot)."""
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/epserve.v1.GenerationService/Generate",
                                   request_serializer=lambda b: b, response_deserializer=g.GenerateResponse.FromString)
        return call(payload, timeout=timeout)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=lambda c: c.name)
def test_bad_request_gets_invalid_argument_naming_the_field(server, model, case):
    with pytest.raises(grpc.RpcError) as err:
        _raw_generate(server, case.build(Limits(model.vocab_size, model.max_model_len)))
    assert err.value.code().name == case.code
    assert err.value.details().startswith(f"{case.field}: "), err.value.details()


def test_oversized_message_is_refused_and_server_stays_healthy(server, client):
    too_big = good(text="x" * (4 * 1024 * 1024 + 10)).SerializeToString()  # server.max_message_bytes is 4 MiB
    with pytest.raises(grpc.RpcError) as err:
        _raw_generate(server, too_big)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.health() == "SERVING"
    assert client.generate([1, 2], max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "epserve.v1.GenerationService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"epserve.v1.GenerationService", "grpc.health.v1.Health"} <= names
        by_symbol = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="epserve.v1.GenerationService")])))
        assert by_symbol[0].file_descriptor_response.file_descriptor_proto


def test_metrics_scrape(server, client):
    client.generate([1, 2, 3], max_new_tokens=4, ignore_eos=True)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for needle in ('epserve_requests_total{code="OK",method="Generate"}', "epserve_generation_tokens_total",
                   "epserve_time_to_first_token_seconds_count", "epserve_inter_token_latency_seconds_bucket",
                   "epserve_queue_depth", "epserve_running_sequences", 'epserve_expert_load_max{layer="0"}',
                   'epserve_expert_load_max_over_mean{layer="0"}', 'epserve_serving_state{state="serving"} 1.0',
                   'epserve_balancedness{axis="rank",stat="p90"}', 'epserve_balancedness{axis="expert",stat="min"}',
                   'epserve_rank_tokens{rank="0"}',
                   'epserve_requests_total{code="INVALID_ARGUMENT",method="Generate"}'):
        assert needle in body, needle
    ttft = [line for line in body.splitlines() if line.startswith("epserve_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 1


@pytest.mark.slow
def test_fuzzed_requests_never_crash_the_server(server, client, model):
    """>= 1000 random requests (hypothesis): each gets OK, INVALID_ARGUMENT or
    RESOURCE_EXHAUSTED, never INTERNAL, and the server stays healthy and idle afterwards."""
    from hypothesis import HealthCheck, given, settings

    from tests.helpers.request_strategies import generate_requests

    seen: dict[str, int] = {}
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/epserve.v1.GenerationService/Generate",
                                   request_serializer=lambda b: b, response_deserializer=g.GenerateResponse.FromString)

        @settings(max_examples=1000, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(data=generate_requests(model.vocab_size, model.max_model_len))
        def one(data: bytes) -> None:
            try:
                call(data, timeout=30)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                assert code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"), (code, exc.details())
            seen[code] = seen.get(code, 0) + 1

        one()
    assert sum(seen.values()) >= 1000 and seen.get("OK") and seen.get("INVALID_ARGUMENT"), seen
    assert client.health() == "SERVING"
    wait_idle(client)


INFO_METHODS = ("GetModelInfo", "GetExpertLoad", "GetServerInfo")
GARBAGE = b"\xff\xff\xff\xff"  # a field key with a truncated varint: no message parses it


def raw_call(target: str, method: str, payload: bytes, metadata=(), credentials=None) -> grpc.RpcError | None:
    """Send raw bytes to a unary method; the RpcError it ended with, or None for OK."""
    with (grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)) as channel:
        call = channel.unary_unary(f"/epserve.v1.GenerationService/{method}", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        try:
            call(payload, timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return exc
    return None


@pytest.mark.parametrize("method", INFO_METHODS)
def test_garbage_to_an_info_method_is_invalid_argument_without_a_traceback(server, client, method):
    """Undecodable bytes to a unary info method: INVALID_ARGUMENT naming the message type, the
    same for 20 calls in a row, and no traceback (at most one log line per call)."""
    before = server.log().count("\n")
    for _ in range(20):
        err = raw_call(server.target, method, GARBAGE)
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert err.details().startswith("request: not a valid ") and "Request" in err.details(), err.details()
    time.sleep(0.2)
    new = server.log().splitlines()[before:]
    assert not [line for line in new if "Traceback" in line or "ERROR" in line], "\n".join(new)
    assert len(new) <= 20, "\n".join(new)
    assert client.health() == "SERVING"


def test_server_log_has_no_progress_bar_junk(server, client):
    """The server's output goes to a file here: no tqdm carriage returns, one plain line instead."""
    client.health()
    log = server.log()
    assert "\r" not in log, repr(log[:300])
    assert "loaded " in log and "MoE layers" in log


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp (Linux)")
def test_metrics_endpoint_listens_on_loopback_only(server):
    """The Prometheus endpoint has no token, so by default it listens on 127.0.0.1 alone
    (a non-loopback server.metrics_host needs server.allow_remote=true)."""
    for port in (server.metrics_port, server.port):
        addresses = listening_addresses(port)
        assert addresses and all(a.is_loopback for a in addresses), (port, addresses)


def test_a_burst_of_unary_calls_is_answered_or_shed_with_cancelled(server, client):
    """4000 GetServerInfo calls at once on one connection: grpc core accepts the first
    grpc.server.max_pending_requests (1000) pending calls, sheds some beyond it and all beyond
    the hard limit (3000) with CANCELLED before the servicer sees them. Each call is answered
    OK or shed, never anything else, and the server serves on (docs/RELIABILITY.md)."""
    import asyncio
    import collections

    async def burst(n: int) -> collections.Counter:
        codes: collections.Counter = collections.Counter()
        async with grpc.aio.insecure_channel(server.target) as channel:
            call = channel.unary_unary("/epserve.v1.GenerationService/GetServerInfo",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)

            async def one() -> None:
                try:
                    await call(b"", timeout=120)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

            await asyncio.gather(*(one() for _ in range(n)))
        return codes

    codes = asyncio.run(burst(4000))
    print("burst of 4000 GetServerInfo:", dict(codes))
    assert set(codes) <= {"OK", "CANCELLED"} and codes["OK"] >= 1000, codes
    assert client.health() == "SERVING"
    assert client.generate([1, 2], max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2


def test_start_up_log_names_the_model_depth_and_the_kv_cache(server, client):
    """A shape may be cut short for benchmarks: the log says how many layers are served, and
    how many KV blocks each rank holds and how many full-length sequences fit."""
    client.health()
    log = server.log()
    assert re.search(r"serving model tiny \(Qwen3MoeForCausalLM, 4 layers, 16 experts, top-2\)", log), log
    assert re.search(r"KV cache per rank: 4096 blocks x 16 tokens = 65536 tokens, [\d.]+ GiB \(engine.kv_cache_tokens\); "
                     r"max concurrency at max_model_len=2048: 1 sequences per rank, 1 in all", log), log  # engine.max_num_seqs=1
