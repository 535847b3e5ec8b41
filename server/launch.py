"""Start-up after the config is validated: build the routing policy for the model's shape
and serve. Start-up errors (unknown policy, impossible parallel setting, missing checkpoint)
print one paragraph and return a non-zero exit code."""
from __future__ import annotations

import sys

from .config import AppConfig, ConfigError
from .routing_setup import build_routing_policy


def launch(app: AppConfig) -> int:
    try:
        num_experts, top_k = 16, 2  # TODO(#3): read from the served model's config
        policy = build_routing_policy(app.routing, num_experts=num_experts, top_k=top_k, ep_size=app.parallel.ep_size)
    except ConfigError as exc:
        print(f"epserve: configuration error: {exc}", file=sys.stderr)
        return 2
    print(f"epserve would serve model={app.model.name} with routing policy {policy!r} "
          f"at ep_size={app.parallel.ep_size} on {app.server.host}:{app.server.port}")
    return 0
