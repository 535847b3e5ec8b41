"""`epserve-client`: generate, info and expert-load from the command line.

    epserve-client generate "Hello" --max-new-tokens 32 --stream
    epserve-client info
    epserve-client expert-load --json | --plot load.png [--reset]
    epserve-client expert-load --steps 1 [--plot step.png]   # the balance of one engine step alone
    epserve-client routing [get]                       # the policy every EP rank runs
    epserve-client routing set greedy_balanced [seed=3 ...]   # needs server.allow_routing_switch=true
    epserve-client generate "Hello" --routed-experts [--include-prompt] --json

Connection: --target (default $EPSERVE_ADDRESS or 127.0.0.1:50051), --token (default
$EPSERVE_TOKEN), --tls / --ca FILE. Errors print "CODE: details" and exit 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
import time
from typing import Any, Sequence

from .channel import DEFAULT_TARGET
from .errors import EpserveError
from .sync_client import Client
from .types import ExpertLoad


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(_jsonable(value), indent=2))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epserve-client", description="Talk to an epserve server.")
    p.add_argument("--target", default=os.environ.get("EPSERVE_ADDRESS", DEFAULT_TARGET), help="host:port")
    p.add_argument("--token", default=None, help="bearer token (default: $EPSERVE_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    p.add_argument("--ca", default=None, help="PEM file of the CA / self-signed certificate to trust (implies --tls)")
    p.add_argument("--server-name", default=None, help="name to check the server certificate against")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call (default 120)")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion")
    g.add_argument("prompt", nargs="?", default=None, help="prompt text")
    g.add_argument("--ids", default=None, help="prompt as comma-separated token ids instead of text")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", action="store_true")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--json", action="store_true",
                   help="print the completion as JSON (with --stream: one JSON line per chunk as it arrives)")
    g.add_argument("--routed-experts", action="store_true",
                   help="return the experts each token was routed to ([rows][MoE layers][k], in --json output)")
    g.add_argument("--include-prompt", action="store_true", help="with --routed-experts: the prompt's rows too")

    r = sub.add_parser("routing", help="read or switch the routing policy")
    r.add_argument("action", nargs="?", choices=("get", "set"), default="get")
    r.add_argument("name", nargs="?", default=None, help="set: a registered policy name (or alias)")
    r.add_argument("params", nargs="*", default=[], help="set: key=value parameters (values parsed as JSON when they can be)")
    r.add_argument("--json", action="store_true")

    i = sub.add_parser("info", help="model and server information")
    i.add_argument("--json", action="store_true")

    a = sub.add_parser("abort", help="end a generation in progress by its request id")
    a.add_argument("request_id")

    e = sub.add_parser("expert-load", help="per-layer, per-expert token counts")
    e.add_argument("--reset", action="store_true", help="zero the counters after reading")
    e.add_argument("--json", action="store_true")
    e.add_argument("--plot", metavar="FILE.png", default=None, help="write a layer x expert heatmap")
    e.add_argument("--steps", type=int, default=0, metavar="N",
                   help="the load of the next N engine steps alone (or more: the exact range is printed), "
                        "from two reads; 1 shows a single step")
    e.add_argument("--wait-s", type=float, default=60.0, help="with --steps: give up after this many seconds")
    return p


def _generate(client: Client, args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.ids is None):
        raise SystemExit("epserve-client generate: give a prompt text or --ids, not both or neither")
    try:
        prompt = args.prompt if args.ids is None else [int(x) for x in args.ids.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"epserve-client generate: --ids must be comma-separated integers, got {args.ids!r}") from None
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_id,
                   ignore_eos=args.ignore_eos, logprobs=args.logprobs, return_routed_experts=args.routed_experts,
                   include_prompt=args.include_prompt)
    if args.stream:
        with client.stream(prompt, **options) as stream:
            for chunk in stream:
                if args.json:  # one JSON object per line and per chunk, as it arrives
                    print(json.dumps(_jsonable(chunk)), flush=True)
                else:
                    print(chunk.text, end="", flush=True)
            completion = stream.completion
        if not args.json:
            print()
    else:
        completion = client.generate(prompt, **options)
        if not args.json:
            print(completion.text)
    if args.json:
        if not args.stream:  # streamed: the chunks were the output
            _print_json(completion)
    else:
        u = completion.usage
        print(f"[{completion.finish_reason.value}: {u.prompt_tokens} prompt + {u.completion_tokens} generated tokens, "
              f"first token after {u.time_to_first_token_s * 1000:.1f} ms, total {u.total_time_s:.3f} s]", file=sys.stderr)
        for i, row in enumerate(completion.routed_experts or ()):
            print(f"row {i:>4}: " + " | ".join(",".join(map(str, ids)) for ids in row))


def _param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"epserve-client routing set: parameters are key=value, got {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw  # a bare string (a path, a mode name)


def _routing(client: Client, args: argparse.Namespace) -> None:
    if args.action == "set":
        if not args.name:
            raise SystemExit("epserve-client routing set: name the policy, e.g. `routing set greedy_balanced`")
        info = client.set_routing_policy(args.name, **dict(_param(p) for p in args.params))
    else:
        if args.name or args.params:
            raise SystemExit("epserve-client routing get takes no arguments")
        info = client.routing_policy()
    if args.json:
        _print_json(info)
        return
    print(f"routing      {info.name} {json.dumps(_jsonable(info.params))}")
    print(f"guarantee    {info.guarantee}")
    if info.counters_reset_unix_s:
        print(f"since        engine step {info.since_engine_step}; expert-load counters reset at "
              f"{info.counters_reset_unix_s:.3f} (Unix time)")


def _info(client: Client, args: argparse.Namespace) -> None:
    model, server = client.info(), client.server_info()
    if args.json:
        _print_json({"model": model, "server": server})
        return
    r = model.routing
    print(f"model        {model.model_name} ({model.architecture}, {model.dtype} on {model.device})")
    print(f"layers       {model.num_layers} ({model.num_moe_layers} MoE), hidden {model.hidden_size}, vocab {model.vocab_size}")
    print(f"experts      {model.num_experts}, top-{model.top_k}, ep_size {model.ep_size}, max_model_len {model.max_model_len}")
    print(f"routing      {r.name} {json.dumps(_jsonable(r.params))}")
    print(f"guarantee    {r.guarantee}")
    print(f"server       epserve {server.version}, {server.state.value}, up {server.uptime_s:.0f} s, "
          f"{'TLS' if server.config.get('tls') else 'plaintext'}, auth {'on' if server.config.get('auth') else 'off'}")
    s = server.stats
    print(f"stats        {s.active_calls} active calls, {s.running_sequences} running, {s.waiting_sequences} waiting, "
          f"KV {s.kv_blocks_used}/{s.kv_blocks_total} blocks, {s.completion_tokens} tokens generated")


def _expert_load_steps(client: Client, args: argparse.Namespace) -> None:
    """The balance of N steps alone: read, wait for N more engine steps, read again, subtract."""
    from .load_window import load_window

    first = client.expert_load()
    deadline = time.monotonic() + args.wait_s
    while client.server_info().stats.engine_steps < first.engine_step + args.steps:
        if time.monotonic() > deadline:
            raise SystemExit(f"epserve-client: fewer than {args.steps} engine steps in {args.wait_s:g} s (is it idle?)")
        time.sleep(0.02)
    window = load_window(first, client.expert_load(reset=args.reset))
    if args.plot:
        from .plot import plot_load_window

        print(f"wrote {plot_load_window(window, args.plot, policy=client.routing_policy().name)}", file=sys.stderr)
    if args.json:
        _print_json({"first_step": window.first_step, "last_step": window.last_step, "ep_size": window.ep_size,
                     "expert_tokens": window.expert_tokens, "rank_tokens": window.rank_tokens,
                     "expert_balancedness": window.expert_balancedness(), "rank_balancedness": window.rank_balancedness()})
    elif not args.plot:
        print(f"engine steps {window.first_step + 1}..{window.last_step} ({window.steps} steps), mean/max per layer")
        print(f"{'layer':>5} {'tokens':>8} {'expert bal':>11} {'rank bal':>9}  per-rank tokens")
        top_k = client.info().top_k
        for i, (experts, ranks) in enumerate(zip(window.expert_tokens, window.rank_tokens)):
            eb, rb = window.expert_balancedness()[i], window.rank_balancedness()[i]
            print(f"{i:>5} {sum(experts) // top_k:>8} {_bal(eb):>11} {_bal(rb):>9}  {' '.join(map(str, ranks))}")


def _bal(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _load_table(load: ExpertLoad) -> None:
    print(f"{load.num_layers} MoE layers x {load.num_experts} experts, ep_size {load.ep_size}, "
          f"{load.seconds_since_reset:.1f} s since reset{' (reset now)' if load.reset else ''}")
    print(f"{'layer':>5} {'tokens':>8} {'max/mean':>9} {'rank max/mean':>14} {'ranks/token':>12}  per-rank tokens")
    for layer in load.layers:
        print(f"{layer.layer:>5} {layer.tokens:>8} {layer.expert_max_over_mean:>9.3f} {layer.rank_max_over_mean:>14.3f} "
              f"{layer.mean_ranks_per_token:>12.3f}  {' '.join(str(t) for t in layer.rank_tokens)}")
    print(f"{'all':>5} {load.tokens_per_layer:>8.0f} {load.expert_max_over_mean:>9.3f} {load.rank_max_over_mean:>14.3f} "
          f"{load.mean_ranks_per_token:>12.3f}  {' '.join(str(t) for t in load.rank_totals)}")


def _expert_load(client: Client, args: argparse.Namespace) -> None:
    if args.steps:
        return _expert_load_steps(client, args)
    load = client.expert_load(reset=args.reset)
    if args.plot:
        from .plot import plot_expert_load

        print(f"wrote {plot_expert_load(load, args.plot, policy=client.routing_policy().name)}", file=sys.stderr)
    if args.json:
        _print_json(load)
    elif not args.plot:
        _load_table(load)


def _abort(client: Client, args: argparse.Namespace) -> None:
    print(f"aborted {client.abort(args.request_id)} call(s) with request id {args.request_id!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with Client(args.target, token=args.token, tls=args.tls, root_certificates=args.ca,
                    server_hostname=args.server_name, timeout=args.timeout) as client:
            {"generate": _generate, "info": _info, "expert-load": _expert_load,
             "routing": _routing, "abort": _abort}[args.command](client, args)
    except EpserveError as exc:
        print(f"epserve-client: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"epserve-client: {exc}", file=sys.stderr)
        return 1
    return 0
