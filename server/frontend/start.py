"""start_engine(app): the one way to get an Engine — the core started where the config says,
the tokenizer loaded meanwhile, an EngineClient returned once the core reports READY.

`server.engine_process=true` (the default) spawns the engine-core process (core/process.py);
false, or `in_thread=True`, runs the same core host on a thread of this process
(core/thread.py; `core=` hands it an EngineCore built already, e.g. after a forced warm-up).
Raises ConfigError (a bad setting, reported by the core before anything is loaded) or
EngineStartError (a rank or the core could not start); nothing is left running then.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from ..config import AppConfig, ConfigError
from ..engine.api import EngineStartError
from ..core.engine_core import EngineCore
from .client import EngineClient
from .pipes import CorePipes
from ..core.messages import Ready, Shutdown, StartFailed, decode, encode

READY_POLL_MS = 200


def _core_error(message: str) -> RuntimeError:
    return RuntimeError(f"the engine core failed to start: {message}")


_START_ERRORS = {"config": ConfigError, "start": EngineStartError}  # StartFailed.kind -> what start_engine raises


def start_engine(app: AppConfig, *, in_thread: bool | None = None, core: EngineCore | None = None) -> EngineClient:
    """The Engine for `app`: blocks until it serves (run it off an event loop that must stay responsive)."""
    from ..worker.distributed import torchrun_env

    if (env := torchrun_env()) is not None and env.rank != 0:
        raise ConfigError(f"start_engine runs on rank 0; this is rank {env.rank} (call run_worker_rank)")
    in_thread = (not app.server.engine_process) if in_thread is None else in_thread
    pipes = CorePipes(in_process=in_thread or core is not None)
    host = _start_host(app, pipes, core)
    loading = ThreadPoolExecutor(1, thread_name_prefix="epserve-tokenizer")
    tokenizer = loading.submit(_load_tokenizer, app)  # while the core starts
    loading.shutdown(wait=False)
    try:
        info, routing = _wait_ready(pipes, host)
        return EngineClient(app, host, pipes, tokenizer.result(), info, routing)
    except BaseException:
        _abandon(host, pipes)
        raise


def _start_host(app: AppConfig, pipes: CorePipes, core: EngineCore | None):
    if pipes.in_process:
        from ..core.thread import CoreThread
        from ..core.startup import build_engine_core

        build = (lambda: core) if core is not None else (lambda: build_engine_core(app))
        return CoreThread(pipes.ctx, pipes.endpoints, build).start()
    from ..core.process import CoreProcess

    return CoreProcess(app, pipes.endpoints).start()


def _wait_ready(pipes: CorePipes, host) -> tuple[Any, Any]:
    """-> (ModelInfo, RoutingPolicyState) from READY; START_FAILED raises what the core met."""
    while True:
        exited = host.exitcode is not None  # read before polling: its last frame is then in
        if pipes.pull.poll(READY_POLL_MS):
            message = decode(pipes.pull.recv())
            if isinstance(message, Ready):
                return message.unpacked()
            if isinstance(message, StartFailed):
                host.join(10)
                raise _START_ERRORS.get(message.kind, _core_error)(message.message)
        elif exited:
            raise EngineStartError(f"{host.description} exited during start-up (exit code {host.exitcode}); "
                                   "see its log above")


def _abandon(host, pipes: CorePipes) -> None:
    """Stop a core that will not be served: SHUTDOWN if it listens, else kill; close the pipes."""
    if host.exitcode is None:
        try:
            pipes.push.send(encode(Shutdown()), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        host.join(10)
    if host.exitcode is None:
        host.kill()
        host.join(10)
    pipes.close(term=host.exitcode is not None)


def _load_tokenizer(app: AppConfig):
    from ..model.loader import load_tokenizer

    return load_tokenizer(app.model)
