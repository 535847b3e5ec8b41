"""What one grpc.aio front-end process costs with no engine behind it: the floor of the served path.

A bare grpc.aio server (its own process) speaks epserve's GenerateStream with the real request
parser and response messages, but has no engine: a step clock ticks every `--step-ms` (0: as
fast as it can) and every open call gets `--interval` tokens per `--interval` ticks, as
`server.stream_interval` would give it. The same load tool as `epserve-load --procs N` drives it.
Per run it prints the client-side wall time, tok/s, and the arrival span on the server (first
call in -> last call in): the time one front end needs just to accept the calls.

Why: the served/in-process ratio at 256 streams is bounded by this. The last stream cannot finish
before it arrives plus its own `new_tokens` engine steps, so with in-process wall T and arrival
span A, served/in-process <= T / (T + A) even for a free engine step loop.

    python scripts/bench_grpc_floor.py --streams 256 --tokens 64 --prompt-tokens 64 --procs 8 --interval 8
    python scripts/bench_grpc_floor.py --step-ms 2.5 ...   # with an engine step of 2.5 ms
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARRIVALS_METHOD = "/epserve.floor.v1.Floor/TakeArrivals"  # -> JSON list of call arrival times (monotonic)


class StepClock:
    """One tick per engine step; every call waits on the same clock, as streams share steps."""

    def __init__(self, step_s: float) -> None:
        self.step_s, self.ticks, self._cond = step_s, 0, asyncio.Condition()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            async with self._cond:
                self.ticks += 1
                self._cond.notify_all()

    async def wait(self, ticks: int) -> None:
        if self.step_s <= 0:
            await asyncio.sleep(0)
            return
        target = self.ticks + ticks
        async with self._cond:
            await self._cond.wait_for(lambda: self.ticks >= target)


def _serve(port: int, step_ms: float, interval: int, ready) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    from clients.pb import generation_pb2 as gen_pb
    from server.rpc.received import parse_generate_request
    from server.rpc.state import SERVICE_NAME

    async def main() -> None:
        arrivals: list[float] = []
        clock = StepClock(step_ms / 1000.0)
        ticker = asyncio.ensure_future(clock.run()) if step_ms > 0 else None

        async def generate_stream(received, context):
            arrivals.append(time.monotonic())
            want = received.message.max_new_tokens
            sent = 0
            await clock.wait(1)  # the prefill step makes the first token; it goes out at once
            while sent < want:
                n = 1 if sent == 0 else min(interval, want - sent)
                if sent:
                    await clock.wait(n)
                sent += n
                msg = gen_pb.GenerateResponse(token_ids=[7] * n)
                if sent == want:
                    msg.finish_reason = gen_pb.FINISH_REASON_LENGTH
                    msg.usage.completion_tokens = want
                    msg.usage.prompt_tokens = len(received.message.token_ids.ids)
                await context.write(msg)

        async def take_arrivals(request: bytes, context) -> bytes:
            out, arrivals[:] = list(arrivals), []
            return json.dumps(out).encode()

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                generate_stream, request_deserializer=parse_generate_request,
                response_serializer=gen_pb.GenerateResponse.SerializeToString)}),
            grpc.method_handlers_generic_handler("epserve.floor.v1.Floor", {
                "TakeArrivals": grpc.unary_unary_rpc_method_handler(take_arrivals)})))
        status = HealthServicer()
        for name in ("", SERVICE_NAME):
            await status.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(status, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()
        if ticker is not None:
            ticker.cancel()

    asyncio.run(main())


def _take_arrivals(target: str) -> list[float]:
    import grpc

    with grpc.insecure_channel(target) as channel:
        return json.loads(channel.unary_unary(ARRIVALS_METHOD)(b"", timeout=30))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per stream")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--procs", type=int, default=8, help="client processes")
    p.add_argument("--interval", type=int, default=8, help="tokens per message (server.stream_interval)")
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated engine step (0: none)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    from server.worker.rendezvous import free_port
    from server.loadtest.procs import run_load_procs
    from server.loadtest.workload import LoadSpec

    ctx = multiprocessing.get_context("spawn")
    port, ready = free_port("127.0.0.1"), ctx.Event()
    server = ctx.Process(target=_serve, args=(port, a.step_ms, a.interval, ready), daemon=True)
    server.start()
    if not ready.wait(60):
        raise SystemExit("the floor server did not start")
    target = f"127.0.0.1:{port}"
    spec = LoadSpec(streams=a.streams, new_tokens=a.tokens, prompt_tokens=a.prompt_tokens)
    runs = []
    try:
        for i in range(a.runs + 1):  # the first run warms connections and code paths up
            res = run_load_procs(target, {}, spec, vocab_size=1000, procs=a.procs)
            spans = _take_arrivals(target)
            bad = [r.error for r in res.streams if r.error]
            if bad:
                raise SystemExit(f"run {i}: {len(bad)} streams failed, e.g. {bad[0]}")
            row = {"run": i, "wall_s": res.wall_s, "tok_s": a.streams * a.tokens / res.wall_s,
                   "arrival_span_s": max(spans) - min(spans), "calls": len(spans)}
            print(f"{'warm-up' if i == 0 else f'run {i}'}: wall {1e3 * row['wall_s']:.1f} ms, "
                  f"{row['tok_s']:,.0f} tok/s, arrival span {1e3 * row['arrival_span_s']:.1f} ms "
                  f"({row['calls']} calls)", flush=True)
            if i:
                runs.append(row)
    finally:
        server.kill()
        server.join(5)
    best = min(runs, key=lambda r: r["arrival_span_s"])
    med = sorted(r["arrival_span_s"] for r in runs)[len(runs) // 2]
    print(f"arrival span of {a.streams} calls through one front end: median {1e3 * med:.1f} ms "
          f"(best {1e3 * best['arrival_span_s']:.1f} ms), {a.procs} client processes")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
