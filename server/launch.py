"""Start-up after the config is validated: open the gRPC port, load the engine, serve until
SIGTERM/SIGINT. Start-up errors (unknown policy, impossible parallel setting, missing
checkpoint, unreadable TLS files, port in use) print one paragraph and return exit code 2."""
from __future__ import annotations

import asyncio
import logging
import sys

from .config import AppConfig, ConfigError

log = logging.getLogger("epserve.server")


def _start_engine(app: AppConfig):
    from .engine.engine import start_engine

    return start_engine(app)


def launch(app: AppConfig) -> int:
    """Serve until stopped; returns the process exit code (0 after a clean drain)."""
    try:
        logging.getLogger().setLevel(str(app.server.log_level).upper())
    except ValueError:
        print(f"epserve: configuration error: server.log_level={app.server.log_level!r} is not one of "
              "DEBUG, INFO, WARNING, ERROR, CRITICAL", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(app))
    except ConfigError as exc:
        print(f"epserve: configuration error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"epserve: start-up failed: {exc}", file=sys.stderr)
        return 2
    except Exception:
        log.exception("epserve: start-up failed")
        return 1


async def _serve(app: AppConfig) -> int:
    from .rpc.app import Server

    return await Server(app, _start_engine).run()
