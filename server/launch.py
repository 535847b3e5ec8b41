"""Start-up after the config is validated: open the gRPC port, load the engine, serve until
SIGTERM/SIGINT. Start-up errors (unknown policy, impossible parallel setting, missing
checkpoint, unreadable, mismatched or swapped TLS files, port in use) print one paragraph and
return exit code 2. Under torchrun, ranks other than 0 run the engine's worker loop and serve
no gRPC.

Processes: this one is the front end (gRPC, tokenizer, stream output). By default
(server.engine_process=true) it spawns the engine-core process, which holds rank 0 and spawns
ranks 1.. (or, under torchrun, joins the process group as rank 0 with the environment torchrun
gave this process, while torchrun's other processes are ranks 1..); false runs the same core
on a thread of this process."""
from __future__ import annotations

import asyncio
import logging
import sys

from .config import AppConfig, ConfigError

log = logging.getLogger("epserve.server")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _configure_logging(level: str) -> None:
    """Hydra's `job_logging: disabled` removes the root handlers and disables every logger that
    existed when it ran; serving needs its log (the address, state changes, errors) on stderr."""
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)
    for name, logger in logging.root.manager.loggerDict.items():
        if isinstance(logger, logging.Logger) and name.split(".")[0] in ("server", "epserve", "clients"):
            logger.disabled = False


def launch(app: AppConfig) -> int:
    """Serve until stopped; returns the process exit code (0 after a clean drain)."""
    try:
        _configure_logging(str(app.server.log_level).upper())
    except ValueError:
        print(f"epserve: configuration error: server.log_level={app.server.log_level!r} is not one of "
              "DEBUG, INFO, WARNING, ERROR, CRITICAL", file=sys.stderr)
        return 2
    from .engine.api import EngineStartError
    from .frontend.start import start_engine
    from .core.startup import run_worker_rank, torchrun_rank
    from .rpc.app import serve
    from .http.front_end import http_front_ends

    try:
        if torchrun_rank() not in (None, 0):
            return run_worker_rank(app)
        return asyncio.run(serve(app, start_engine, http_front_ends(app)))
    except ConfigError as exc:
        print(f"epserve: configuration error: {exc}", file=sys.stderr)
        return 2
    except (EngineStartError, FileNotFoundError) as exc:
        print(f"epserve: start-up failed: {exc}", file=sys.stderr)
        return 2
    except Exception:
        log.exception("epserve: start-up failed")
        return 1
