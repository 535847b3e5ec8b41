"""`dry_run=true`: every start-up check, no weights loaded, no port bound.

Reads the model's config.json (or the configured shape), builds the routing policy against
it and prints what would be served, so a user can check a plan (and a plugin author their
policy's registration and parameters) in a second.
"""
from __future__ import annotations

import sys

from .config import AppConfig, ConfigError
from .eplb_setup import build_eplb_settings
from .routing_setup import build_routing_policy


def dry_run(app: AppConfig) -> int:
    from .model.loader import read_model_spec

    try:
        spec = read_model_spec(app.model)
        policy = build_routing_policy(app.routing, num_experts=spec.num_experts, top_k=spec.top_k, ep_size=app.parallel.ep_size,
                                      num_layers=spec.num_moe_layers)
        eplb = build_eplb_settings(app.parallel, spec, app.parallel.ep_size)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"epserve: configuration error: {exc}", file=sys.stderr)
        return 2
    placed = ""
    if eplb is not None:
        source = f"from {eplb.stats_path}" if eplb.stats_path else "from even loads"
        every = f", rebalanced every {eplb.interval} steps" if eplb.interval else ""
        placed = f", EPLB: {spec.num_experts}+{eplb.redundant_experts} expert slots per layer placed {source} ({eplb.policy}){every}"
    print(
        f"epserve dry run: model={app.model.name} ({spec.architecture}, {spec.num_layers} layers, "
        f"{spec.num_experts} experts, top-{spec.top_k}), routing policy {policy!r}, "
        f"ep_size={app.parallel.ep_size}{placed}, would listen on {app.server.host}:{app.server.port}"
    )
    return 0
