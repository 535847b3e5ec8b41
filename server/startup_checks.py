"""Every start-up check that needs no device, run before anything listens or spawns.

The launch plan (server/launch_plan.py) resolves the model's spec, the routing policy and its
parameters against it, EPLB and dispatch rules and the kernel choices; on top of it this checks
what loading would trip over later: the model folder's weight and tokenizer files, and the log
level. A bad setting is thus one paragraph and exit code 2 within seconds, not a failure after
the port is open and the engine is half started.
"""
from __future__ import annotations

import logging

from .config import AppConfig, ConfigError
from .launch_plan import LaunchPlan, build_launch_plan

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def check_before_listening(app: AppConfig) -> LaunchPlan:
    """The launch plan of `app`, or ConfigError naming the key that is wrong."""
    from .model.loader import check_model_files
    from .model.spec import ModelLoadError

    level = str(app.server.log_level).upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"server.log_level={app.server.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    plan = build_launch_plan(app)
    try:
        check_model_files(app.model)
    except (ModelLoadError, FileNotFoundError) as exc:
        raise ConfigError(f"model.path: {exc}") from exc
    logging.getLogger(__name__).debug("start-up checks passed: %s", plan.describe())
    return plan
