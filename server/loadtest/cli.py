"""`epserve-load`: concurrent streaming load against an epserve server, with checks.

    epserve-load                                  # spawn the embedded model, 256 streams x 64 tokens
    epserve-load --streams 32 --tokens 16         # the CI-sized run
    epserve-load --cancel-fraction 0.5 --seed 7   # cancellation storm
    epserve-load --target 127.0.0.1:50051 --server-pid 1234   # an external server (memory needs the pid)
    epserve-load --server-arg routing=fake_balance --server-arg parallel=ep2
    epserve-load --streams 128 --tokens 16 --procs 4 --compare-in-process   # served vs the engine alone
    epserve-load --front-end both --requests 128 --tokens 64   # HTTP vs gRPC: TTFT/TPOT/ITL, tokens/s
    epserve-load --front-end http --rate 10 --prompts-file prompts.txt --http-url http://127.0.0.1:8000/v1

Exit code 0 when every check passed, 1 when one failed (listed at the end), 2 on bad usage.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Sequence

from clients import AsyncClient, RetryPolicy
from clients.channel import DEFAULT_TARGET

from .report import to_json, to_text
from .session import LoadReport, run_session
from .spawn import SpawnedServer
from .traffic_cli import add_traffic_arguments, run_traffic_mode
from .workload import LoadSpec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epserve-load", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--target", default=None, help=f"host:port of a running server (e.g. {DEFAULT_TARGET}); "
                                                  "default: spawn `python -m server` on a free loopback port")
    p.add_argument("--server-pid", type=int, default=None, help="pid of the --target server, to measure its RSS")
    p.add_argument("--server-arg", action="append", default=[], help="Hydra override for the spawned server (repeatable)")
    p.add_argument("--server-log", default=None, help="where the spawned server logs (default: a temp file)")
    p.add_argument("--token", default=None, help="bearer token (default: $EPSERVE_TOKEN)")
    p.add_argument("--ca", default=None, help="PEM file to trust (implies TLS)")
    p.add_argument("--streams", type=int, default=256, help="concurrent streams (default 256)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per stream, ignore_eos (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=8, help="random prompt ids per stream (default 8)")
    p.add_argument("--cancel-fraction", type=float, default=0.0, help="share of streams cancelled at random points")
    p.add_argument("--slow-readers", type=int, default=0, help="streams that sleep before reading each message")
    p.add_argument("--slow-delay", type=float, default=0.2, help="seconds a slow reader sleeps per message")
    p.add_argument("--seed", type=int, default=0, help="seeds prompts, cancel choices and points")
    p.add_argument("--runs", type=int, default=2, help="identical runs; the first is the memory baseline (default 2)")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="seconds the server may take to be idle after a run")
    p.add_argument("--mem-tolerance-mib", type=float, default=8.0, help="allowed RSS growth, MiB (default 8) ...")
    p.add_argument("--mem-tolerance-frac", type=float, default=0.01, help="... or this share of the baseline, if larger")
    p.add_argument("--procs", type=int, default=1, help="client processes the streams are dealt to (default 1)")
    p.add_argument("--compare-in-process", action="store_true",
                   help="first run the same prompts on the engine alone in this process (built from the same "
                        "--server-arg overrides), then print served / in-process tokens/s")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    add_traffic_arguments(p)
    return p


async def _session(args: argparse.Namespace, spec: LoadSpec, target: str, pid: int | None) -> LoadReport:
    retry = RetryPolicy(max_attempts=1)  # a load test must see every failure, not retry it away
    options = {"token": args.token, "root_certificates": args.ca}
    async with AsyncClient(target, timeout=60.0, retry=retry, **options) as client:
        return await run_session(client, spec, runs=args.runs, server_pid=pid, idle_timeout_s=args.idle_timeout,
                                 tolerance_mib=args.mem_tolerance_mib, tolerance_frac=args.mem_tolerance_frac,
                                 procs=args.procs, target=target, client_options=options)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.front_end is not None:  # open-loop traffic with latency percentiles (traffic_cli.py)
        return run_traffic_mode(args)
    try:
        spec = LoadSpec(streams=args.streams, new_tokens=args.tokens, prompt_tokens=args.prompt_tokens,
                        cancel_fraction=args.cancel_fraction, slow_readers=args.slow_readers,
                        slow_read_delay_s=args.slow_delay, seed=args.seed)
        if args.runs < 1:
            raise ValueError("--runs must be >= 1")
        if args.procs < 1 or args.procs > args.streams:
            raise ValueError("--procs must be in [1, --streams]")
        if args.server_pid is not None and not os.path.exists(f"/proc/{args.server_pid}/status"):
            raise ValueError(f"--server-pid {args.server_pid}: no such process (memory is read from /proc)")
    except ValueError as exc:
        print(f"epserve-load: {exc}", file=sys.stderr)
        return 2
    in_process = None
    if args.compare_in_process:  # before the server starts: the engine alone has the machine
        from .in_process import run_in_process

        in_process = run_in_process(args.server_arg, spec, runs=args.runs)
    spawned = None
    if args.target is None:
        spawned = SpawnedServer(args.server_arg, args.server_log).start()
        print(f"spawned server pid {spawned.pid} on {spawned.target} (log {spawned.log_path})", file=sys.stderr)
    try:
        target = args.target or spawned.target
        pid = spawned.pid if spawned else args.server_pid
        report = asyncio.run(_session(args, spec, target, pid))
    finally:
        code = spawned.stop() if spawned is not None else 0
    if code != 0:
        report.failures.append(f"the spawned server exited with code {code} after SIGTERM; see {spawned.log_path}")
    report.in_process = in_process
    print(to_text(report))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(to_json(report), f, indent=2)
    return 0 if report.ok else 1
