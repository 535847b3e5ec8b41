"""`dry_run=true`: every start-up check, no weights loaded, no port bound.

Builds the launch plan the engine would build (server/launch_plan.py: the model's config.json
or configured shape, the routing policy against it, EPLB, dispatch, kernels) and prints what
would be served, so a user can check a plan (and a plugin author their policy's registration
and parameters) in a second.
"""
from __future__ import annotations

import sys

from .config import AppConfig, ConfigError
from .launch_plan import build_launch_plan


def dry_run(app: AppConfig) -> int:
    try:
        plan = build_launch_plan(app)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"epserve: configuration error: {exc}", file=sys.stderr)
        return 2
    for note in plan.overrides:
        print(f"epserve: {note}", file=sys.stderr)
    print(f"epserve dry run: {plan.describe()}, would listen on {app.server.host}:{app.server.port}")
    return 0
