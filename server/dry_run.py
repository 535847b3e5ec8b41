"""`dry_run=true`: every start-up check, no weights loaded, no port bound.

Reads the model's config.json (or the configured shape), builds the routing policy against
it and prints what would be served, so a user can check a plan (and a plugin author their
policy's registration and parameters) in a second.
"""
from __future__ import annotations

import sys

from .config import AppConfig, ConfigError
from .routing_setup import build_routing_policy


def dry_run(app: AppConfig) -> int:
    from .model.loader import read_model_spec

    try:
        spec = read_model_spec(app.model)
        policy = build_routing_policy(app.routing, num_experts=spec.num_experts, top_k=spec.top_k, ep_size=app.parallel.ep_size)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"epserve: configuration error: {exc}", file=sys.stderr)
        return 2
    print(
        f"epserve dry run: model={app.model.name} ({spec.architecture}, {spec.num_layers} layers, "
        f"{spec.num_experts} experts, top-{spec.top_k}), routing policy {policy!r}, "
        f"ep_size={app.parallel.ep_size}, would listen on {app.server.host}:{app.server.port}"
    )
    return 0
