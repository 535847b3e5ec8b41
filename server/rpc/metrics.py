"""Prometheus metrics: call outcomes, tokens, latencies (pushed by the service as calls run)
and engine gauges plus per-layer expert load (read from the engine at scrape time, on the
server's event loop; the endpoint itself is metrics_http.py).

Labels are bounded: method x status code for calls, the MoE layer index for expert load (one
series per layer, never per expert or per request). The registry is private to the server, so
tests can build several servers in one process.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.api import EngineStats
from server.moe.load_stats import ExpertLoadSnapshot

from .metrics_http import MetricsHttpServer

log = logging.getLogger(__name__)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SCRAPE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class EngineSample:
    stats: EngineStats | None
    load: ExpertLoadSnapshot | None
    phase: str


def observe_many(histogram: Histogram, value: float, count: int) -> None:
    """`count` observations of the same `value` at the cost of one (a stream message carries
    several tokens; no per-token Python on the event loop). Same result as a loop of observe()."""
    if count <= 0:
        return
    if count == 1:
        histogram.observe(value)
        return
    histogram._sum.inc(value * count)  # prometheus_client keeps per-bucket (non-cumulative) counts
    for bound, bucket in zip(histogram._upper_bounds, histogram._buckets):
        if value <= bound:
            bucket.inc(count)
            return


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("epserve_requests", "Generation calls finished, by method and gRPC status code.",
                                ["method", "code"], registry=r)
        self.prompt_tokens = Counter("epserve_prompt_tokens", "Prompt tokens of admitted calls.", registry=r)
        self.generation_tokens = Counter("epserve_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("epserve_time_to_first_token_seconds",
                              "From a call's arrival to its first generated token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("epserve_inter_token_latency_seconds",
                             "Time between successive generated tokens of one call.", buckets=ITL_BUCKETS, registry=r)
        self.duration = Histogram("epserve_request_duration_seconds", "Generation call duration.",
                                  ["method"], buckets=DURATION_BUCKETS, registry=r)
        self.active_calls = Gauge("epserve_active_calls", "Generation calls in progress.", registry=r)
        self._render: Callable[[], Awaitable[bytes]] | None = None

    def requests_by_code(self) -> dict[str, int]:
        """Calls finished so far, by status code, over both generation methods."""
        out: dict[str, int] = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    code = sample.labels["code"]
                    out[code] = out.get(code, 0) + int(sample.value)
        return out

    def totals(self) -> tuple[int, int]:
        """(prompt tokens, generated tokens) so far."""
        def value(counter: Counter) -> int:
            return int(next(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total")))

        return value(self.prompt_tokens), value(self.generation_tokens)

    def serve_http(self, host: str, port: int, sample: Callable[[], Awaitable[EngineSample]]) -> MetricsHttpServer:
        """Start the endpoint on the running event loop (OSError if it cannot listen)."""
        server = MetricsHttpServer(host, port, self.renderer(sample))
        server.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
        return server

    def renderer(self, sample: Callable[[], Awaitable[EngineSample]]) -> Callable[[], Awaitable[bytes]]:
        """The Prometheus text of every metric, engine gauges included (the metrics endpoint
        and the HTTP front end's /metrics share it; the engine collector registers once)."""
        if self._render is not None:
            return self._render
        engine = EngineCollector()
        self.registry.register(engine)

        async def render() -> bytes:
            try:
                engine.sample = await asyncio.wait_for(sample(), SCRAPE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the engine is busy or gone
                engine.sample = None
                log.warning("metrics scrape could not read the engine: %r", exc)
            try:
                return generate_latest(self.registry)
            finally:
                engine.sample = None

        self._render = render
        return render


class EngineCollector(Collector):
    """The engine's stats and expert load, as read for the scrape being rendered (`sample`,
    set by the endpoint on the event loop just before it renders)."""

    def __init__(self) -> None:
        self.sample: EngineSample | None = None

    def describe(self) -> list:
        return []  # names are dynamic; never sample the engine at registration time

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.sample
        if s is None:
            return
        state = GaugeMetricFamily("epserve_serving_state", "1 for the server's current state.", labels=["state"])
        for phase in ("LOADING", "SERVING", "DRAINING", "FAILED"):
            state.add_metric([phase.lower()], 1.0 if s.phase == phase else 0.0)
        yield state
        if s.stats is not None:
            st = s.stats
            yield GaugeMetricFamily("epserve_queue_depth", "Requests admitted and waiting.", value=st.waiting)
            yield GaugeMetricFamily("epserve_running_sequences", "Sequences in the running batch (all ranks).", value=st.running)
            yield GaugeMetricFamily("epserve_kv_blocks_used", "KV-cache blocks in use (all ranks).", value=st.kv_blocks_used)
            yield GaugeMetricFamily("epserve_kv_blocks_total", "KV-cache blocks (all ranks).", value=st.kv_blocks_total)
            yield CounterMetricFamily("epserve_engine_steps", "Engine steps executed.", value=st.steps)
        if s.load is not None and s.load.num_layers:
            yield from _expert_load_families(s.load)


def _expert_load_families(load: ExpertLoadSnapshot) -> Iterator[GaugeMetricFamily]:
    names = {
        "max": ("epserve_expert_load_max", "Tokens routed to the busiest expert of each MoE layer since the last reset."),
        "mean": ("epserve_expert_load_mean", "Mean tokens per expert of each MoE layer since the last reset."),
        "ratio": ("epserve_expert_load_max_over_mean", "Busiest expert / mean expert per MoE layer (1 = balanced)."),
        "rank": ("epserve_rank_load_max_over_mean", "Busiest EP rank / mean rank per MoE layer (1 = balanced)."),
    }
    fams = {k: GaugeMetricFamily(n, h, labels=["layer"]) for k, (n, h) in names.items()}
    expert_ratio, rank_ratio = load.expert_max_over_mean(), load.rank_max_over_mean()
    for i, row in enumerate(load.expert_tokens):
        label = [str(i)]
        fams["max"].add_metric(label, max(row) if row else 0)
        fams["mean"].add_metric(label, sum(row) / len(row) if row else 0.0)
        fams["ratio"].add_metric(label, expert_ratio[i])
        fams["rank"].add_metric(label, rank_ratio[i])
    yield from fams.values()
    bal = GaugeMetricFamily("epserve_balancedness",
                            "Mean/max load per MoE layer over EP ranks or experts, aggregated over layers "
                            "(1 = balanced; 0 when nothing was routed since the last reset).", labels=["axis", "stat"])
    for axis, stats in load.balancedness().items():
        for stat, value in stats.items():
            bal.add_metric([axis, stat], value or 0.0)
    yield bal
    ranks = GaugeMetricFamily("epserve_rank_tokens", "(token, expert) assignments each EP rank computed since the "
                              "last reset, summed over MoE layers.", labels=["rank"])
    for r, total in enumerate(map(sum, zip(*load.rank_tokens()))):
        ranks.add_metric([str(r)], total)
    yield ranks
