"""`epserve-load --front-end grpc|http|both`: open-loop traffic with latency percentiles.

    epserve-load --front-end both --requests 128 --tokens 64           # HTTP vs gRPC, one spawned server
    epserve-load --front-end http --rate 20 --prompts-file prompts.txt --http-url http://127.0.0.1:8000/v1
    epserve-load --front-end grpc --target 127.0.0.1:50051 --rate 5 --requests 200

`both` alternates the front ends for --rounds rounds on one server (same engine, same
prompts) and reports best HTTP tokens/s over best gRPC tokens/s.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
from pathlib import Path

from .memory import cpu_seconds, process_tree
from .latency import served_ratio, summarize, traffic_table
from .spawn import SpawnedServer
from .traffic import TrafficSpec, default_prompts, read_prompts, run_traffic


def add_traffic_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("traffic mode (--front-end)")
    g.add_argument("--front-end", choices=("grpc", "http", "both"), default=None,
                   help="open-loop traffic with TTFT/TPOT/ITL percentiles against this front end")
    g.add_argument("--http-url", default=None, help="OpenAI base URL of a running server (e.g. http://127.0.0.1:8000/v1)")
    g.add_argument("--requests", type=int, default=128, help="requests to send (default 128)")
    g.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    g.add_argument("--prompts-file", default=None,
                   help="prompts, one per line or a JSON list (default: the shipped corpus, server/assets/load_prompts.txt)")
    g.add_argument("--rounds", type=int, default=2, help="with --front-end both: alternating rounds (default 2)")


def run_traffic_mode(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(Path(args.prompts_file)) if args.prompts_file else default_prompts()
        spec = TrafficSpec(requests=args.requests, new_tokens=args.tokens, rate=args.rate, prompts=prompts,
                           seed=args.seed)
        if args.rounds < 1:
            raise ValueError("--rounds must be >= 1")
    except (ValueError, OSError) as exc:
        print(f"epserve-load: {exc}", file=sys.stderr)
        return 2
    front_ends = ["grpc", "http"] * args.rounds if args.front_end == "both" else [args.front_end]
    needs_http = args.front_end != "grpc"
    spawned = None
    if args.target is None and (args.http_url is None or not needs_http):
        spawned = SpawnedServer(args.server_arg, args.server_log, http=needs_http).start()
        print(f"spawned server pid {spawned.pid} on {spawned.target} (log {spawned.log_path})", file=sys.stderr)
    grpc_target = args.target or (spawned.target if spawned else "")
    http_url = args.http_url or (f"http://127.0.0.1:{spawned.http_port}/v1" if spawned else "")
    summaries = []
    try:
        if spawned is not None:
            _wait_ready(grpc_target, args.token)
        pid = spawned.pid if spawned else args.server_pid
        for front_end in front_ends:
            before = _cpu(pid)
            traces, wall = asyncio.run(run_traffic(front_end, spec, grpc_target=grpc_target, http_base_url=http_url,
                                                   token=args.token))
            after = _cpu(pid)
            summaries.append(summarize(front_end, traces, wall, tuple(b - a for a, b in zip(before, after))
                                       if before and after else (None, None, None)))
            print(f"{front_end}: {summaries[-1].tokens_per_s:.1f} tokens/s", file=sys.stderr)
    except RuntimeError as exc:  # the HTTP front end refused the run (token, URL)
        print(f"epserve-load: {exc}", file=sys.stderr)
        return 1
    finally:
        if spawned is not None:
            spawned.stop()
    print(traffic_table(summaries))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"spec": {"requests": spec.requests, "new_tokens": spec.new_tokens, "rate": spec.rate,
                                "prompts": len(spec.prompts)},
                       "runs": [s.to_json() for s in summaries], "http_over_grpc": served_ratio(summaries)}, f, indent=2)
    return 0 if all(s.errors == 0 for s in summaries) else 1


def _cpu(pid: int | None) -> tuple[float, float, float] | None:
    """CPU seconds so far: the server process, its descendants (engine core, ranks), this process."""
    if pid is None:
        return None
    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        tree = process_tree(pid)
        return (cpu_seconds(pid), sum(cpu_seconds(p) for p in tree if p != pid), own.ru_utime + own.ru_stime)
    except OSError:
        return None


def _wait_ready(target: str, token: str | None) -> None:
    from clients import Client

    with Client(target, token=token) as client:
        client.wait_ready(300)
