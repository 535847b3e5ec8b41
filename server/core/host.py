"""What every host of the engine core does, in its own process or on a thread: connect the two
pipes, build the core (report START_FAILED, or READY with the model and policy), run the
CoreLoop until SHUTDOWN or a failure.

The host decides what to do after: the process exits (process.py), the thread stops
the ranks and closes its sockets (thread.py).
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Callable

import zmq

from ..config import ConfigError
from ..engine.api import EngineStartError
from .engine_core import EngineCore
from .loop import EXIT_CONFIG, EXIT_FAILED, CoreLoop
from .messages import Ready, StartFailed, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreEndpoints:
    """Where the front end bound its two pipes (ipc:// paths or inproc:// names)."""

    inputs: str  # front end -> core
    outputs: str  # core -> front end


@dataclass
class CoreRun:
    """How a host's run ended: the exit code, and the loop (None if the core never started)."""

    code: int
    loop: CoreLoop | None
    inputs: zmq.Socket
    outputs: zmq.Socket


def serve_core(ctx: zmq.Context, endpoints: CoreEndpoints, build_core: Callable[[], EngineCore],
               on_fatal: Callable[[CoreLoop], None] | None = None) -> CoreRun:
    """Connect, build, report, run. Start-up errors go to the front end as START_FAILED
    ("config" for a ConfigError, "start" for a rank or checkpoint that failed, else "error")."""
    outputs = ctx.socket(zmq.PUSH)
    outputs.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a burst: frames are few and small
    outputs.setsockopt(zmq.LINGER, 5000)
    outputs.connect(endpoints.outputs)
    inputs = ctx.socket(zmq.PULL)  # connected now, so that it is up by the time READY is read
    inputs.connect(endpoints.inputs)
    try:
        core = build_core()
    except (ConfigError, EngineStartError, FileNotFoundError) as exc:
        kind = "config" if isinstance(exc, ConfigError) else "start"
        outputs.send(encode(StartFailed(kind, str(exc))))
        return CoreRun(EXIT_CONFIG, None, inputs, outputs)
    except BaseException as exc:  # noqa: BLE001 - reported to the front end
        log.error("engine start-up failed:\n%s", traceback.format_exc())
        outputs.send(encode(StartFailed("error", f"{type(exc).__name__}: {exc}")))
        return CoreRun(EXIT_FAILED, None, inputs, outputs)
    loop = CoreLoop(core, inputs, outputs, on_fatal)
    loop.send(encode(Ready.of(core.model_info(), core.routing_policy())))
    return CoreRun(loop.run(), loop, inputs, outputs)
