"""Make an EPLB statistics file (stats.py) from one of three sources.

  policy  run a routing policy by itself on the model's shape, each EP rank's share of the
          tokens with the token offsets the engine gives it, and count. Exact for policies
          that ignore the router (`skewed`, `replay`, `round_robin_balanced`, ...): they pick
          experts from token indices, so these counts are what the served model will see.
          Router-driven policies get random router logits here, which says little.
  trace   count a routing trace written by `routing=record` (one file, or `{rank}` in the
          path for one file per EP rank).
  server  read GetExpertLoad from a running epserve (what natural routing really did).

A benchmark run's JSON (server/bench: {"load": {"expert_tokens": ...}}) and
`epserve-client expert-load --json` are read as stats files directly, no conversion needed.

    python -m server.moe.eplb.build_stats policy --model conf/model/qwen3_30b_a3b.yaml \\
        --ep-size 4 --routing name=skewed mode=hot_ranks target=2 -o stats.json
    python -m server.moe.eplb.build_stats trace '/tmp/run.rank{rank}.eptrace' --ep-size 2 -o stats.json
    python -m server.moe.eplb.build_stats server 127.0.0.1:50051 -o stats.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..router import softmax_topk
from ..routing import RoutingContext, RoutingPolicy
from .stats import write_expert_load


def policy_expert_load(policy: RoutingPolicy, *, num_layers: int, num_experts: int, top_k: int, ep_size: int,
                       tokens_per_rank: int, chunk: int = 8192, seed: int = 0) -> list[list[int]]:
    """[layer][E] (token, expert) counts of `policy` over `tokens_per_rank` tokens on each rank.

    Rank r's tokens carry global indices r*T .. (r+1)*T - 1 (token_offset = r*T), as if every
    rank ran T tokens in one step; long runs go in chunks, offsets continuing."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(num_layers):
        counts = torch.zeros(num_experts, dtype=torch.int64)
        for rank in range(ep_size):
            for start in range(0, tokens_per_rank, chunk):
                n = min(chunk, tokens_per_rank - start)
                ctx = RoutingContext(layer=layer, num_experts=num_experts, top_k=top_k, ep_rank=rank, ep_size=ep_size,
                                     token_offset=rank * tokens_per_rank + start)
                logits = torch.randn(n, num_experts, generator=gen)  # [n, E] stand-in router
                weights, ids = softmax_topk(logits, top_k, renormalize=True)
                routed, _ = policy(ids.to(torch.int32), weights, logits, ctx)  # [n, k]
                counts += torch.bincount(routed.reshape(-1).long(), minlength=num_experts)
        out.append(counts.tolist())
    return out


def trace_expert_load(path: str, ep_size: int = 1) -> tuple[list[list[int]], str]:
    """[layer][E] counts of a recorded routing trace, summed over the EP ranks' files."""
    from ..routing.record import RANK_FIELD, rank_path
    from ..routing.trace_file import read_trace

    paths = [rank_path(path, r) for r in range(ep_size)] if RANK_FIELD in path else [Path(path)]
    total: list[torch.Tensor] = []
    for p in paths:
        trace = read_trace(p)
        for layer in range(trace.num_layers):
            counts = trace.expert_counts(layer)
            if layer < len(total):
                total[layer] += counts
            else:
                total.append(counts.clone())
    return [c.tolist() for c in total], f"trace {', '.join(str(p) for p in paths)}"


def server_expert_load(target: str, reset: bool = False) -> tuple[list[list[int]], str]:
    from clients import Client

    with Client(target) as client:
        load = client.expert_load(reset=reset)
    return load.matrix(), f"GetExpertLoad from {target} ({load.seconds_since_reset:.0f} s window)"


def _value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _model_spec(model: str, overrides: Sequence[str]):
    """--model: a conf/model/*.yaml (ModelConfig fields) or a Hugging Face model folder."""
    import yaml

    from ...config import ModelConfig
    from ...model.loader import read_model_spec

    path = Path(model).expanduser()
    data: dict[str, Any] = {"path": str(path)} if path.is_dir() else (yaml.safe_load(path.read_text()) or {})
    for item in overrides:  # dotted keys, e.g. shape.num_hidden_layers=48
        key, _, text = item.partition("=")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _value(text)
    known = {"name", "path", "shape", "dtype", "max_model_len", "seed"}
    return read_model_spec(ModelConfig(**{k: v for k, v in data.items() if k in known}))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.moe.eplb.build_stats", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="source", required=True)
    pol = sub.add_parser("policy", help="run a routing policy alone on the model's shape")
    pol.add_argument("--model", required=True, help="conf/model/*.yaml or a Hugging Face model folder")
    pol.add_argument("--set", dest="overrides", nargs="*", default=[], help="model overrides, e.g. shape.num_hidden_layers=48")
    pol.add_argument("--ep-size", type=int, required=True)
    pol.add_argument("--routing", nargs="+", required=True, help="name=POLICY then its parameters, e.g. name=skewed target=2")
    pol.add_argument("--tokens", type=int, default=16384, help="tokens per rank per layer (default 16384)")
    tr = sub.add_parser("trace", help="count a routing trace (routing=record)")
    tr.add_argument("path", help="trace file; '{rank}' in it: one file per EP rank")
    tr.add_argument("--ep-size", type=int, default=1)
    sv = sub.add_parser("server", help="GetExpertLoad from a running server")
    sv.add_argument("target", help="host:port")
    sv.add_argument("--reset", action="store_true")
    for s in (pol, tr, sv):
        s.add_argument("-o", "--out", required=True, help="where to write the stats JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        loads, source = _collect(args)
    except (ValueError, OSError, RuntimeError) as exc:  # ConfigError, TraceError, ModelLoadError, client errors
        print(f"build_stats: {exc}", file=sys.stderr)
        return 2
    path = write_expert_load(args.out, loads, source)
    print(f"wrote {path}: {len(loads)} layers x {len(loads[0])} experts ({source})", file=sys.stderr)
    return 0


def _collect(args: argparse.Namespace) -> tuple[list[list[int]], str]:
    if args.source == "policy":
        from ...config import AppConfig, RoutingConfig
        from ...launch_plan import build_launch_plan

        spec = _model_spec(args.model, args.overrides)
        routing = dict(item.partition("=")[::2] for item in args.routing)
        cfg = RoutingConfig.from_dict({k: _value(v) if k != "name" else v for k, v in routing.items()})
        policy = build_launch_plan(AppConfig(routing=cfg), ep_size=args.ep_size, spec=spec).policy
        loads = policy_expert_load(policy, num_layers=spec.num_moe_layers, num_experts=spec.num_experts,
                                   top_k=spec.top_k, ep_size=args.ep_size, tokens_per_rank=args.tokens)
        source = f"policy {policy!r} at ep {args.ep_size}, {args.tokens} tokens per rank per layer, model {args.model}"
        return loads, source
    if args.source == "trace":
        return trace_expert_load(args.path, args.ep_size)
    return server_expert_load(args.target, args.reset)


if __name__ == "__main__":
    sys.exit(main())
