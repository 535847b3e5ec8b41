"""bench.served: the main request set through gRPC, beside the in-process figure.

After the in-process ranks are gone (their memory freed), `python -m server` starts as a
subprocess with the run's model and parallel settings, the natural policy and the engine
limits the in-process run used (loadtest/spawn.py: port 0, the bound port read back from
its log). `bench.served_clients` client processes (the repo's AsyncClient, one channel each)
split the requests between them and stream them all at once, `warmup + repeats` rounds, each
started together at a barrier. A round's end-to-end tok/s is B x O generated tokens over the
time from the first request sent to the last token received: the in-process definition
(drive.py), so served / in-process is the share of the engine's speed a client gets.
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import statistics
import time
from typing import Sequence

from ..config import AppConfig
from .request_sets import RequestSet
from .settings import BenchSettings
from .stats import describe, ratio_of_medians_ci


def server_overrides(settings: BenchSettings, app: AppConfig) -> list[str]:
    """Hydra overrides for `python -m server`: the run's model/parallel choices (as given on
    the bench's command line), natural routing, the in-process engine limits, a free port."""
    chosen = list(settings.server_overrides) or [f"model={settings.model.name}", f"parallel.ep_size={settings.ep_size}"]
    eng = app.engine
    return [*chosen, "routing=natural", f"engine.max_num_seqs={eng.max_num_seqs}",
            f"engine.max_num_batched_tokens={eng.max_num_batched_tokens}", f"engine.kv_block_size={eng.kv_block_size}",
            f"engine.kv_cache_tokens={eng.kv_cache_tokens}", f"engine.max_queue={eng.max_queue}"]


async def _one_stream(client, prompt: Sequence[int], new_tokens: int) -> tuple[int, float]:
    """-> (token ids received, seconds to the first one)."""
    start, ttft, count = time.monotonic(), None, 0
    async with client.stream(list(prompt), max_new_tokens=new_tokens, ignore_eos=True, temperature=0.0,
                             text_output=False, timeout=600.0) as stream:
        async for chunk in stream:
            if chunk.token_ids and ttft is None:
                ttft = time.monotonic() - start
            count += len(chunk.token_ids)
    return count, ttft if ttft is not None else float("nan")


async def _client_rounds(target: str, prompts: list, new_tokens: int, rounds: int, barrier, results) -> None:
    from clients import AsyncClient, RetryPolicy

    async with AsyncClient(target, timeout=600.0, retry=RetryPolicy(max_attempts=1)) as client:
        await client.wait_ready(timeout=600.0)
        loop = asyncio.get_running_loop()
        for rnd in range(rounds):
            await loop.run_in_executor(None, barrier.wait)
            t0 = time.monotonic()
            outs = await asyncio.gather(*(_one_stream(client, p, new_tokens) for p in prompts))
            results.put((rnd, t0, time.monotonic(), sum(n for n, _ in outs), [t for _, t in outs]))


def _client_main(target: str, prompts: list, new_tokens: int, rounds: int, barrier, results) -> None:
    """Entry of a client process."""
    try:
        asyncio.run(_client_rounds(target, prompts, new_tokens, rounds, barrier, results))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        barrier.abort()
        raise


def run_served(settings: BenchSettings, app: AppConfig, requests: RequestSet, in_process_e2e: list[float]) -> dict:
    from ..loadtest.spawn import SpawnedServer

    o = settings.bench
    rounds = o.warmup + o.repeats
    clients = min(o.served_clients, requests.batch)
    shares = [list(requests.prompts[i::clients]) for i in range(clients)]
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(clients + 1), ctx.Queue()
    server = SpawnedServer(server_overrides(settings, app)).start(timeout=900.0)
    procs = [ctx.Process(target=_client_main, args=(server.target, share, requests.output_len, rounds, barrier, results),
                         daemon=True) for share in shares]
    try:
        for proc in procs:
            proc.start()
        tok_s, ttfts = [], []
        for rnd in range(rounds):
            barrier.wait(timeout=900.0)
            got = [results.get(timeout=900.0) for _ in procs]
            errors = [g[1] for g in got if g[0] == "error"]
            if errors:
                raise RuntimeError(f"a served client failed: {errors[0]} (server log {server.log_path})")
            tokens = sum(g[3] for g in got)
            if tokens != requests.batch * requests.output_len:
                raise RuntimeError(f"served round {rnd}: {tokens} tokens, expected {requests.batch * requests.output_len}")
            if rnd >= o.warmup:
                tok_s.append(tokens / (max(g[2] for g in got) - min(g[1] for g in got)))
                ttfts += [t for g in got for t in g[4]]
        for proc in procs:
            proc.join(timeout=60)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        code = server.stop()
    return {"clients": clients, "server_overrides": server.overrides, "server_exit_code": code,
            "served_tok_s": describe(tok_s), "in_process_tok_s": describe(in_process_e2e),
            "ratio": ratio_of_medians_ci(tok_s, in_process_e2e), "ttft_p50_s": statistics.median(ttfts),
            "definition": "end to end: B x O generated tokens / (first request sent -> last token received)"}
