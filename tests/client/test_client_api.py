"""The Python client library (sync and asyncio) and the `epserve-client` CLI against a real
server subprocess."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from clients import (
    AsyncClient, Chunk, Client, Completion, ExpertLoad, FinishReason, ModelInfo, NO_RETRY, RetryPolicy, ServerInfo,
    errors,
)
from tests.helpers.server_process import ROOT, ServerProcess, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("client")) as srv:
        yield srv


def wait_idle(client: Client, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while (s := client.server_info().stats).running_sequences or s.active_calls or s.kv_blocks_used:
        assert time.monotonic() < end, f"not idle: {s}"
        time.sleep(0.05)


def test_sync_client_methods_return_plain_types(server):
    with Client(server.target) as c:
        out = c.generate("Hello there", max_new_tokens=4, ignore_eos=True)
        assert isinstance(out, Completion) and isinstance(out.finish_reason, FinishReason)
        assert isinstance(out.token_ids, tuple) and all(type(t) is int for t in out.token_ids)
        with c.stream("Hello there", max_new_tokens=4, ignore_eos=True) as s:
            chunks = list(s)
        assert all(isinstance(ch, Chunk) for ch in chunks) and s.completion.token_ids == out.token_ids
        assert isinstance(c.info(), ModelInfo) and isinstance(c.server_info(), ServerInfo)
        assert isinstance(c.expert_load(), ExpertLoad)


def test_async_client_matches_sync(server):
    async def run():
        async with AsyncClient(server.target) as c:
            out = await c.generate([7, 8, 9], max_new_tokens=5, ignore_eos=True)
            async with c.stream([7, 8, 9], max_new_tokens=5, ignore_eos=True) as s:
                chunks = [ch async for ch in s]
            info, load, sinfo = await c.info(), await c.expert_load(), await c.server_info()
            assert await c.health() == "SERVING"
            return out, chunks, s.completion, info, load, sinfo

    out, chunks, completion, info, load, sinfo = asyncio.run(run())
    with Client(server.target) as c:
        assert c.generate([7, 8, 9], max_new_tokens=5, ignore_eos=True).token_ids == out.token_ids
        assert info == c.info()
    assert [t for ch in chunks for t in ch.token_ids] == list(out.token_ids) == list(completion.token_ids)
    assert load.num_experts == info.num_experts and sinfo.state.value == "serving"


def test_n_top_and_prompt_logprobs_sync_stream_and_async_agree(server):
    """One seeded n=3 call, three ways: the same sequences, each with its own top-N logprobs,
    the prompt's logprobs on sequence 0; a greedy n=2 call gives two equal sequences."""
    opts = dict(max_new_tokens=5, ignore_eos=True, temperature=1.0, seed=7, n=3, top_logprobs=2,
                prompt_logprobs=True)
    with Client(server.target) as c:
        out = c.generate("Hello there", **opts)
        with c.stream("Hello there", **opts) as s:
            chunks = list(s)
        greedy = c.generate("Hello there", max_new_tokens=5, ignore_eos=True, n=2)
    assert [ch.index for ch in out.choices] == [0, 1, 2] and out.token_ids == out.choices[0].token_ids
    assert len({ch.token_ids for ch in out.choices}) > 1  # sampled: the sequences differ
    for ch in out.choices:
        assert len(ch.top_logprobs) == len(ch.token_ids) == len(ch.logprobs) == 5
        assert all(len(top) == 2 and top[0][1] >= top[1][1] for top in ch.top_logprobs)
        assert all(lp <= top[0][1] + 1e-6 for lp, top in zip(ch.logprobs, ch.top_logprobs))
    prompt_len = out.usage.prompt_tokens
    assert len(out.prompt_logprobs) == len(out.prompt_top_logprobs) == prompt_len - 1
    assert all(ch.prompt_logprobs is None for ch in out.choices[1:])
    assert {ch.index for ch in chunks} == {0, 1, 2}
    assert [ch.token_ids for ch in s.completion.choices] == [ch.token_ids for ch in out.choices]
    assert s.completion.prompt_logprobs == pytest.approx(out.prompt_logprobs, abs=1e-6)

    async def run():
        async with AsyncClient(server.target) as c:
            return await c.generate("Hello there", **opts)

    assert [ch.token_ids for ch in asyncio.run(run()).choices] == [ch.token_ids for ch in out.choices]
    assert len(greedy.choices) == 2 and greedy.choices[0].token_ids == greedy.choices[1].token_ids


def test_async_stream_close_cancels_on_the_server(server):
    async def run():
        async with AsyncClient(server.target) as c:
            n = (await c.info()).max_model_len - 8
            stream = c.stream([1, 2, 3], max_new_tokens=n, ignore_eos=True)
            async with stream:
                async for i, _ in _enumerate(stream):
                    if i == 3:
                        break
            with pytest.raises(errors.DeadlineExceededError):
                await c.generate([1, 2, 3], max_new_tokens=n, ignore_eos=True, timeout=0.3)

    asyncio.run(run())
    with Client(server.target) as c:
        wait_idle(c)


async def _enumerate(aiter):
    i = 0
    async for item in aiter:
        yield i, item
        i += 1


def test_many_concurrent_async_streams(server):
    async def one(c: AsyncClient, i: int) -> int:
        async with c.stream([1 + i % 50, 2, 3], max_new_tokens=6, ignore_eos=True) as s:
            return sum([len(ch.token_ids) async for ch in s])

    async def run():
        async with AsyncClient(server.target) as c:
            return await asyncio.gather(*(one(c, i) for i in range(16)))

    assert asyncio.run(run()) == [6] * 16


def test_invalid_request_is_not_retried(server):
    with Client(server.target, retry=RetryPolicy(max_attempts=5, initial_backoff_s=1.0)) as c:
        start = time.monotonic()
        with pytest.raises(errors.InvalidRequestError, match="sampling.top_p"):
            c.generate("hi", top_p=1.5)
        assert time.monotonic() - start < 0.9


def test_unavailable_is_retried_with_backoff_then_raised():
    port = free_port()  # nothing listens there
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.2, max_backoff_s=0.2, jitter=0.0)
    with Client(f"127.0.0.1:{port}", retry=policy, timeout=10) as c:
        start = time.monotonic()
        with pytest.raises(errors.UnavailableError):
            c.info()
        assert time.monotonic() - start >= 0.4  # two backoff sleeps
    with Client(f"127.0.0.1:{port}", retry=NO_RETRY, timeout=10) as c:
        with pytest.raises(errors.UnavailableError):
            with c.stream("hi") as s:
                next(s)


def _cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clients", "--target", server.target, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_generate_info_and_expert_load(server, tmp_path):
    run = _cli(server, "generate", "--ids", "1,2,3", "--max-new-tokens", "4", "--ignore-eos", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert len(doc["token_ids"]) == 4 and doc["finish_reason"] == "length"

    run = _cli(server, "generate", "Hello", "--max-new-tokens", "3", "--ignore-eos", "--stream")
    assert run.returncode == 0 and "3 generated tokens" in run.stderr, run.stderr

    run = _cli(server, "info")
    assert run.returncode == 0 and "experts" in run.stdout and "routing" in run.stdout, run.stderr

    run = _cli(server, "expert-load", "--json")
    load = json.loads(run.stdout)
    assert run.returncode == 0 and len(load["layers"]) == load["num_layers"] >= 1

    png = tmp_path / "load.png"
    run = _cli(server, "expert-load", "--plot", str(png))
    assert run.returncode == 0, run.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = _cli(server, "expert-load")
    assert run.returncode == 0 and "max/mean" in run.stdout


def test_cli_reports_errors_with_the_status(server):
    run = _cli(server, "generate", "hi", "--temperature", "-1")
    assert run.returncode == 1 and "INVALID_ARGUMENT: sampling.temperature" in run.stderr


def test_cli_expert_load_of_single_steps(server, tmp_path):
    """--steps N: two reads stamped with their engine step, subtracted. One decoding sequence
    routes exactly one token per MoE layer per step, so the window holds top_k x steps
    assignments in every layer, however many steps passed between the reads."""
    from clients.load_window import load_window
    from clients.plot import window_title

    with Client(server.target, timeout=120) as c:
        model = c.info()
        first = c.expert_load()
        assert first.engine_step >= 1  # the warm-up generation ran
        with c.stream([1, 2, 3], max_new_tokens=model.max_model_len - 8, ignore_eos=True) as stream:
            next(stream)
            next(stream)  # decoding now
            run = _cli(server, "expert-load", "--steps", "1", "--json")
            assert run.returncode == 0, run.stderr
            window = json.loads(run.stdout)
            png = tmp_path / "step.png"
            plotted = _cli(server, "expert-load", "--steps", "2", "--plot", str(png))
        assert plotted.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plotted.stderr
        steps = window["last_step"] - window["first_step"]
        assert steps >= 1
        assert [sum(row) for row in window["expert_tokens"]] == [model.top_k * steps] * model.num_moe_layers
        assert [sum(row) for row in window["rank_tokens"]] == [model.top_k * steps] * model.num_moe_layers
        assert all(0 < b <= 1 for b in window["expert_balancedness"])
        last = c.expert_load()
        whole = load_window(first, last)
        assert whole.steps == last.engine_step - first.engine_step and whole.steps >= steps
        assert "natural: expert load of engine " in window_title(whole, "natural")
