"""The Prometheus endpoint cannot touch gRPC: 800 scrapes at once are all answered quickly,
and 2,500 connections that send nothing, opened and then torn down at once, leave gRPC health
answering within a second all along (a health prober in its own process measures it). Before,
the endpoint ran a thread per connection behind an accept backlog of 5: scrapes saw TCP
retry gaps (p99 17 s) and tearing down slow connections stalled health for seconds."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from tests.helpers.server_process import ROOT, ServerProcess

SCRAPES, SLOW = 800, 2500

HEALTH_PROBE = """
import json, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies = []
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    print("probing", flush=True)
    while not stop.is_set():
        start = time.monotonic()
        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status
        latencies.append(time.monotonic() - start)
        assert status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.02)
print(json.dumps(latencies), flush=True)
"""


async def _scrape(port: int) -> tuple[float, bytes]:
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    body = await reader.read()
    writer.close()
    return time.monotonic() - start, body


async def _attack(port: int) -> dict:
    took = sorted(t for t, body in await asyncio.gather(*[_scrape(port) for _ in range(SCRAPES)])
                  if body.startswith(b"HTTP/1.1 200") and b"epserve_requests" in body)
    slow = await asyncio.gather(*[asyncio.open_connection("127.0.0.1", port) for _ in range(SLOW)])
    for _, writer in slow[::2]:
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # half a request head, never finished
    await asyncio.sleep(1.0)
    for _, writer in slow:  # torn down all at once
        writer.transport.abort()
    await asyncio.sleep(2.0)
    after, body = await asyncio.wait_for(_scrape(port), 10)
    return {"answered": len(took), "p99": took[int(0.99 * len(took)) - 1] if took else None,
            "after_teardown_s": after, "after_ok": body.startswith(b"HTTP/1.1 200")}


def test_scrapes_and_slow_connections_cannot_stall_grpc_health(tmp_path):
    with ServerProcess(tmp_path, metrics=True) as srv:
        probe = subprocess.Popen([sys.executable, "-c", HEALTH_PROBE, srv.target], cwd=ROOT, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert probe.stdout.readline().strip() == "probing"
            time.sleep(0.5)
            result = asyncio.run(_attack(srv.metrics_port))
            out, _ = probe.communicate("", timeout=60)
        finally:
            probe.kill()
        latencies = json.loads(out.strip().splitlines()[-1])
    print(f"scrapes {result}, health max {max(latencies):.3f}s over {len(latencies)} checks")
    assert result["answered"] == SCRAPES and result["p99"] < 3.0, result
    assert result["after_ok"] and result["after_teardown_s"] < 5.0, result
    assert len(latencies) > 20 and max(latencies) < 1.0, (max(latencies), len(latencies))
