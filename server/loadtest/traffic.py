"""Open-loop traffic against either front end: Poisson arrivals at a request rate, prompts
from a file, and each request's token arrival times (for TTFT, TPOT and ITL percentiles).

Both front ends are driven the same way: one streaming request per arrival, `ignore_eos`
and greedy, so every request asks for exactly `new_tokens` tokens and the two front ends
do the same engine work. gRPC goes through the epserve AsyncClient; HTTP through a lean
client (sse_client.py) against /v1/completions with server-sent events (the
`return_token_ids` extension gives exact token counts per event).
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from clients import AsyncClient, EpserveError

from .sse_client import HttpStatusError, post_events

FRONT_ENDS = ("grpc", "http")


def default_prompts() -> tuple[str, ...]:
    """The small corpus shipped with the package (server/assets/load_prompts.txt)."""
    return read_prompts(Path(str(resources.files("server") / "assets" / "load_prompts.txt")))


def read_prompts(path: Path) -> tuple[str, ...]:
    """One prompt per line, or a JSON list of strings (a .json file); blank lines skipped."""
    text = Path(path).read_text()
    prompts = json.loads(text) if str(path).endswith(".json") else [line for line in text.splitlines() if line.strip()]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"{path}: expected non-empty prompts (one per line, or a JSON list of strings)")
    return tuple(prompts)


@dataclass(frozen=True)
class TrafficSpec:
    requests: int = 128
    new_tokens: int = 64
    rate: float | None = None  # Poisson arrivals per second; None: every request at once
    prompts: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1 or self.new_tokens < 1:
            raise ValueError(f"requests and new_tokens must be >= 1, got {self.requests} and {self.new_tokens}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")

    def arrivals(self) -> list[float]:
        """Seconds after the start at which each request is sent (exponential gaps: Poisson)."""
        if self.rate is None:
            return [0.0] * self.requests
        rng, at, out = random.Random(self.seed), 0.0, []
        for _ in range(self.requests):
            out.append(at)
            at += rng.expovariate(self.rate)
        return out

    def prompt(self, i: int) -> str:
        return self.prompts[i % len(self.prompts)]


@dataclass
class RequestTrace:
    sent: float
    events: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, tokens in it)
    error: str | None = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.events)


async def _grpc_request(client: AsyncClient, spec: TrafficSpec, i: int, trace: RequestTrace) -> None:
    try:
        async with client.stream(spec.prompt(i), max_new_tokens=spec.new_tokens, ignore_eos=True,
                                 temperature=0.0) as stream:  # text too: the same detokenizing work as HTTP
            async for chunk in stream:
                if chunk.token_ids:
                    trace.events.append((time.perf_counter(), len(chunk.token_ids)))
    except EpserveError as exc:
        trace.error = f"{exc.code}: {exc}"


async def _http_request(url: str, headers: dict[str, str], model: str, spec: TrafficSpec, i: int,
                        trace: RequestTrace) -> None:
    body = {"model": model, "prompt": spec.prompt(i), "max_tokens": spec.new_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    try:
        async for event in post_events(url, body, headers):
            if "error" in event:
                trace.error = event["error"]["message"]
                return
            n = sum(len(c.get("token_ids") or ()) for c in event["choices"])
            if n:
                trace.events.append((time.perf_counter(), n))
    except Exception as exc:  # noqa: BLE001 - a load tool records every failure and goes on
        trace.error = str(exc) if isinstance(exc, HttpStatusError) else repr(exc)


async def run_traffic(front_end: str, spec: TrafficSpec, *, grpc_target: str = "", http_base_url: str = "",
                      token: str | None = None) -> tuple[list[RequestTrace], float]:
    """Send every request at its arrival time; (traces, wall seconds from the first send to the last token)."""
    if front_end not in FRONT_ENDS:
        raise ValueError(f"front end must be one of {FRONT_ENDS}, got {front_end!r}")
    traces: list[RequestTrace] = []
    arrivals = spec.arrivals()

    async def drive(send) -> float:
        start = time.perf_counter()
        tasks = []
        for i, at in enumerate(arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            trace = RequestTrace(time.perf_counter())
            traces.append(trace)
            tasks.append(asyncio.ensure_future(send(i, trace)))
        await asyncio.gather(*tasks)
        end = max((t.events[-1][0] for t in traces if t.events), default=time.perf_counter())
        return end - start

    if front_end == "grpc":
        async with AsyncClient(grpc_target, token=token, timeout=600.0) as client:
            return traces, await drive(lambda i, t: _grpc_request(client, spec, i, t))
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers, timeout=60.0) as http:
        reply = await http.get(f"{http_base_url}/models")
    if reply.status_code != 200:
        raise RuntimeError(f"GET {http_base_url}/models: HTTP {reply.status_code} {reply.text[:200]}")
    model = reply.json()["data"][0]["id"]
    url = f"{http_base_url}/completions"
    return traces, await drive(lambda i, t: _http_request(url, headers, model, spec, i, t))
