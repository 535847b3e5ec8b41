"""epserve-load's traffic mode: Poisson arrivals, prompts from a file, and the latency
summary, against both front ends of the real server."""
from __future__ import annotations

import asyncio
import statistics

import pytest

from server.loadtest.latency import served_ratio, summarize, traffic_table
from server.loadtest.traffic import TrafficSpec, default_prompts, read_prompts, run_traffic
from tests.http.conftest import TOKEN


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate():
    spec = TrafficSpec(requests=4000, rate=50.0, prompts=("x",), seed=3)
    times = spec.arrivals()
    assert times == TrafficSpec(requests=4000, rate=50.0, prompts=("x",), seed=3).arrivals()
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 50.0, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50.0, rel=0.1)  # exponential: stdev = mean
    assert TrafficSpec(requests=3, prompts=("x",)).arrivals() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate"):
        TrafficSpec(rate=0.0)


def test_prompts_from_a_file_and_the_shipped_corpus(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("first\n\nsecond prompt\n")
    assert read_prompts(lines) == ("first", "second prompt")
    listed = tmp_path / "p.json"
    listed.write_text('["a", "b\\nc"]')
    assert read_prompts(listed) == ("a", "b\nc")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="non-empty"):
        read_prompts(tmp_path / "empty.txt")
    assert len(default_prompts()) >= 10


@pytest.mark.parametrize("front_end", ["grpc", "http"])
def test_traffic_run_counts_every_token_and_times_them(server, front_end):
    spec = TrafficSpec(requests=6, new_tokens=5, rate=40.0, prompts=default_prompts()[:3])
    traces, wall = asyncio.run(run_traffic(front_end, spec, grpc_target=server.target,
                                           http_base_url=server.http_base_url, token=TOKEN))
    summary = summarize(front_end, traces, wall)
    assert (summary.requests, summary.errors, summary.tokens) == (6, 0, 30)
    assert all(t.events[0][0] > t.sent for t in traces)
    assert summary.ttft_s[50] <= summary.ttft_s[99] < wall
    assert summary.tpot_s[50] > 0 and summary.itl_s[99] > 0
    assert front_end in traffic_table([summary])


def test_refusals_are_reported(server):
    spec = TrafficSpec(requests=2, new_tokens=5, prompts=("x",))
    with pytest.raises(RuntimeError, match="HTTP 401"):
        asyncio.run(run_traffic("http", spec, http_base_url=server.http_base_url, token="wrong"))
    traces, _ = asyncio.run(run_traffic("grpc", spec, grpc_target=server.target, token="wrong"))
    assert all(t.error and t.error.startswith("UNAUTHENTICATED") for t in traces)


def test_ratio_is_best_http_over_best_grpc():
    from server.loadtest.traffic import RequestTrace

    def run(fe, tokens_per_s):
        t = RequestTrace(0.0, [(0.5, 1), (1.0, int(tokens_per_s) - 1)])
        return summarize(fe, [t], 1.0)

    assert served_ratio([run("grpc", 100), run("http", 90), run("grpc", 80)]) == pytest.approx(0.9)
    assert served_ratio([run("grpc", 100)]) is None
