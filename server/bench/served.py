"""bench.served: the main request set through gRPC, beside the in-process figure.

After the in-process ranks are gone (their memory freed), `python -m server` starts as a
subprocess with the run's model and parallel settings, the natural policy and the engine
limits the in-process run used (loadtest/spawn.py: port 0, the bound port read back from
its log). `bench.served_clients` client processes (epserve-load's, loadtest/procs.py: the
repo's AsyncClient, one channel each) split the requests between them and release them all
at once at a barrier, `warmup + repeats` rounds. A round's end-to-end tok/s is B x O
generated tokens over release -> last token received: the in-process definition (drive.py,
submission -> last token), so served / in-process is the share of the engine's speed a
client gets.
"""
from __future__ import annotations

import statistics

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
            f"engine.kv_cache_tokens={eng.kv_cache_tokens}", f"engine.max_queue={eng.max_queue}",
            f"engine.gpu_memory_utilization={eng.gpu_memory_utilization}"]


def run_served(settings: BenchSettings, app: AppConfig, requests: RequestSet, in_process_e2e: list[float]) -> dict:
    from ..loadtest.procs import run_plans_procs
    from ..loadtest.spawn import SpawnedServer
    from ..loadtest.workload import LoadSpec, StreamPlan

    o = settings.bench
    clients = min(o.served_clients, requests.batch)
    spec = LoadSpec(streams=requests.batch, new_tokens=requests.output_len, stream_timeout_s=900.0)
    plans = [StreamPlan(index=i, prompt=p, cancel_after=None, slow=False) for i, p in enumerate(requests.prompts)]
    server = SpawnedServer(server_overrides(settings, app)).start(timeout=900.0)
    tok_s, ttfts = [], []
    try:
        for rnd in range(o.warmup + o.repeats):
            run = run_plans_procs(server.target, {}, spec, plans, clients)
            if run.errors or run.tokens != requests.batch * requests.output_len:
                first = run.errors[0].error if run.errors else f"{run.tokens} tokens"
                raise RuntimeError(f"served round {rnd}: {len(run.errors)} streams failed or short ({first}); "
                                   f"expected {requests.batch * requests.output_len} tokens (server log {server.log_path})")
            if rnd >= o.warmup:
                tok_s.append(run.tokens / run.wall_s)
                ttfts += [r.ttft_s for r in run.streams]
    finally:
        code = server.stop()
    return {"clients": clients, "server_overrides": server.overrides, "server_exit_code": code,
            "served_tok_s": describe(tok_s), "in_process_tok_s": describe(in_process_e2e),
            "ratio": ratio_of_medians_ci(tok_s, in_process_e2e), "ttft_p50_s": statistics.median(ttfts),
            "definition": "end to end: B x O generated tokens / (streams released at once -> last token received)"}
