"""Latency percentiles of a traffic run: TTFT, time per output token, inter-token latency.

Definitions (as vLLM's and genai-perf's benchmarks use them, measured at the client):
* TTFT: request sent -> first token received;
* TPOT: (last token - first token) / (tokens - 1), per request;
* ITL: gap between successive stream events, spread over the tokens of the later event (one
  value per token), over every request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .report import percentile
from .traffic import RequestTrace

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class TrafficSummary:
    front_end: str
    requests: int
    errors: int
    tokens: int
    wall_s: float
    ttft_s: dict[int, float | None]
    tpot_s: dict[int, float | None]
    itl_s: dict[int, float | None]
    first_error: str | None = None
    # CPU seconds over the run (user + system), when the server's pid is known: the front-end
    # process (gRPC and HTTP serving), the engine core under it, and this load generator
    frontend_cpu_s: float | None = None
    core_cpu_s: float | None = None
    client_cpu_s: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"front_end": self.front_end, "requests": self.requests, "errors": self.errors, "tokens": self.tokens,
                "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s, "first_error": self.first_error,
                "frontend_cpu_s": self.frontend_cpu_s, "core_cpu_s": self.core_cpu_s, "client_cpu_s": self.client_cpu_s,
                **{f"{name}_p{p}_s": getattr(self, f"{name}_s")[p] for name in ("ttft", "tpot", "itl")
                   for p in PERCENTILES}}


def summarize(front_end: str, traces: list[RequestTrace], wall_s: float,
              cpu: tuple[float | None, float | None, float | None] = (None, None, None)) -> TrafficSummary:
    ok = [t for t in traces if t.error is None and t.events]
    ttft = [t.events[0][0] - t.sent for t in ok]
    tpot = [(t.events[-1][0] - t.events[0][0]) / (t.tokens - 1) for t in ok if t.tokens > 1]
    itl: list[float] = []
    for t in ok:
        for (before, _), (at, n) in zip(t.events, t.events[1:]):
            itl.extend([(at - before) / n] * n)
    errors = [t for t in traces if t.error is not None]
    return TrafficSummary(front_end, len(traces), len(errors), sum(t.tokens for t in traces), wall_s,
                          {p: percentile(ttft, p) for p in PERCENTILES}, {p: percentile(tpot, p) for p in PERCENTILES},
                          {p: percentile(itl, p) for p in PERCENTILES}, errors[0].error if errors else None, *cpu)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def traffic_table(summaries: list[TrafficSummary]) -> str:
    """A markdown table, one row per run, and the HTTP / gRPC throughput ratio when both ran."""
    head = ("| front end | requests | errors | tokens/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms "
            "| ITL p50/p90/p99 ms | CPU s: front end / engine core / load tool |\n|---|---|---|---|---|---|---|---|")
    rows = [f"| {s.front_end} | {s.requests} | {s.errors} | {s.tokens_per_s:.1f} | "
            + " | ".join("/".join(_ms(getattr(s, f"{n}_s")[p]) for p in PERCENTILES) for n in ("ttft", "tpot", "itl"))
            + " | " + " / ".join("-" if v is None else f"{v:.2f}" for v in (s.frontend_cpu_s, s.core_cpu_s, s.client_cpu_s))
            + " |" for s in summaries]
    lines = [head, *rows]
    ratio = served_ratio(summaries)
    if ratio is not None:
        lines.append(f"\nHTTP served / gRPC served tokens/s: {ratio:.3f}")
    for s in summaries:
        if s.first_error:
            lines.append(f"{s.front_end}: {s.errors} request(s) failed, first: {s.first_error}")
    return "\n".join(lines)


def served_ratio(summaries: list[TrafficSummary]) -> float | None:
    """Best HTTP tokens/s over best gRPC tokens/s (the best of each absorbs one-off noise)."""
    best = {}
    for s in summaries:
        best[s.front_end] = max(best.get(s.front_end, 0.0), s.tokens_per_s)
    if best.get("grpc") and "http" in best:
        return best["http"] / best["grpc"]
    return None
