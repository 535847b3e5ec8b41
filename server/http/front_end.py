"""The HTTP front end's listener: uvicorn on the gRPC server's event loop, same process.

In-process on purpose: it talks to the engine core through the one EngineClient the gRPC
service holds (no second engine, no extra hop), and shares that service's state, limits,
tokenizer thread and metrics. The socket is bound here, so a port in use is a start-up
config error (exit 2) like the gRPC port, before the engine loads. uvicorn installs no
signal handlers: the gRPC server's SIGTERM handling drains both front ends.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

import uvicorn

from server.config import AppConfig, ConfigError
from server.rpc.auth import resolve_token
from server.rpc.listening import listening_socket

from .app import build_app

if TYPE_CHECKING:
    from server.rpc.service import GenerationService

log = logging.getLogger("epserve.server")


class _EmbeddedUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the gRPC server owns SIGTERM / SIGINT
        yield


class HttpFrontEnd:
    def __init__(self, app: AppConfig) -> None:
        self.app = app
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task | None = None
        self.address = ""

    def _bind(self) -> socket.socket:
        cfg = self.app.server
        try:
            return listening_socket(cfg.http_host, cfg.http_port)
        except OSError as exc:
            raise ConfigError(f"server.http_host/server.http_port: cannot listen on {cfg.http_host}:{cfg.http_port} "
                              f"({exc.strerror or exc})") from None

    async def start(self, service: "GenerationService") -> None:
        sock = self._bind()
        host, port = sock.getsockname()[:2]
        # httptools: uvicorn's C parser (h11, the other choice, is pure Python and runs on this event loop)
        config = uvicorn.Config(build_app(service, resolve_token(self.app.server)), lifespan="off",
                                log_level="warning", access_log=False, http="httptools", loop="none",
                                timeout_graceful_shutdown=1)
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.005)
        if self._task.done():
            self._task.result()  # raises what stopped it
        shown = f"[{host}]" if ":" in host else host
        self.address = f"{shown}:{port}"
        log.info("OpenAI-compatible HTTP front end listening on http://%s/v1", self.address)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, 5.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - stopping must not fail the shutdown
            log.warning("the HTTP front end did not stop cleanly", exc_info=True)


def http_front_ends(app: AppConfig) -> list[HttpFrontEnd]:
    """The extra front ends server.* asks for (none when server.http_port is 0)."""
    return [HttpFrontEnd(app)] if app.server.http_port else []
