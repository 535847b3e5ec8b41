"""Build the grpc.aio server, load the engine behind it, serve, and shut down cleanly.

Order of events: the port opens first with health NOT_SERVING (so a bad port fails fast and
probes see the server loading), then the engine loads in a worker thread and runs a warm-up
generation, then health turns SERVING. SIGTERM/SIGINT drains: health NOT_SERVING, new generation calls get UNAVAILABLE,
calls in flight get server.grace_period_s to finish and are then cancelled (UNAVAILABLE);
exit code 0. A second signal skips the rest of the grace period. If the engine dies, health
turns NOT_SERVING, calls fail with UNAVAILABLE and the process exits with code 1 so a
supervisor restarts it.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from contextlib import aclosing
from pathlib import Path
from typing import Awaitable, Callable, Protocol, Sequence

import grpc
from grpc_health.v1 import health as health_v1
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clients.pb import service_pb2  # noqa: F401  (registers the service descriptor for reflection)
from server.config import AppConfig, ConfigError, is_loopback
from server.engine.api import Engine, GenerationRequest, SamplingParams, StopParams

from .auth import BearerTokenInterceptor, resolve_token
from .metrics import ServerMetrics
from .metrics_http import MetricsHttpServer
from .service import GenerationService
from .state import SERVICE_NAME, Phase, ServingState
from .busy_log import BusyLog
from .tls import check_key_pair

log = logging.getLogger("epserve.server")
EXIT_OK, EXIT_ENGINE_FAILED = 0, 1
EngineFactory = Callable[[AppConfig], "Engine | Awaitable[Engine]"]  # sync ones run in a worker thread


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r} ({exc.strerror or exc})") from None


def server_credentials(app: AppConfig) -> grpc.ServerCredentials | None:
    cfg = app.server
    if not cfg.tls_cert:
        return None
    pair = (_read(cfg.tls_key, "server.tls_key"), _read(cfg.tls_cert, "server.tls_cert"))
    check_key_pair(cfg.tls_cert, cfg.tls_key, cert_pem=pair[1], key_pem=pair[0])
    return grpc.ssl_server_credentials([pair])




class ExtraFrontEnd(Protocol):
    """Another front end in this process on the same engine (the HTTP one: server/http). It
    listens from start() (before the engine loads), reads the service's state and shares its
    call slots, so draining covers it; stop() runs once the calls have drained."""

    async def start(self, service: GenerationService) -> None: ...
    async def stop(self) -> None: ...


class Server:
    """One serving process: gRPC server + engine + lifecycle."""

    def __init__(self, app: AppConfig, start_engine: EngineFactory, front_ends: Sequence[ExtraFrontEnd] = ()) -> None:
        cfg = app.server
        self.app, self._start_engine = app, start_engine
        self.front_ends = tuple(front_ends)
        token = resolve_token(cfg)
        self._credentials = server_credentials(app)
        if cfg.metrics_port and not (is_loopback(cfg.metrics_host) or cfg.allow_remote):
            raise ConfigError(f"server.metrics_host={cfg.metrics_host!r} is not a loopback address; "
                              "set server.allow_remote=true to expose metrics beyond this machine")
        engine_room = app.engine.max_num_seqs * app.parallel.ep_size + app.engine.max_queue
        if engine_room < cfg.max_concurrent_streams:
            log.warning("the engine holds %d requests (engine.max_num_seqs x ep_size + engine.max_queue) but "
                        "server.max_concurrent_streams=%d: past %d concurrent calls the engine's queue refuses "
                        "first", engine_room, cfg.max_concurrent_streams, engine_room)
        self.state = ServingState()
        self.metrics = ServerMetrics()
        self.service = GenerationService(app, self.state, self.metrics, self._engine_unavailable,
                                         tls=self._credentials is not None, auth=token is not None)
        self.grpc = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(token)] if token else [],
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a port already in use is an error, not a shared port
                # Ping idle connections so that a client that vanished without closing its
                # stream is noticed and its sequence freed.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
        )
        self.grpc.add_generic_rpc_handlers((self.service.rpc_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.state.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_v1.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self.engine: Engine | None = None
        self.exit_code = EXIT_OK
        self._stop = asyncio.Event()
        self._signals = 0
        self._metrics_http: MetricsHttpServer | None = None

    async def run(self) -> int:
        cfg = self.app.server
        await self.state.start()
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        address = f"{host}:{cfg.port}"
        try:
            bound = (self.grpc.add_secure_port(address, self._credentials) if self._credentials
                     else self.grpc.add_insecure_port(address))
        except RuntimeError:
            bound = 0
        if not bound:
            raise ConfigError(f"server.host/server.port: cannot listen on {address} "
                              "(the port is in use, or the host is not an address of this machine)")
        if cfg.metrics_port:  # on this event loop, never a thread per scrape (metrics_http.py)
            try:
                self._metrics_http = self.metrics.serve_http(cfg.metrics_host, cfg.metrics_port,
                                                             self.service.sample_for_metrics)
            except OSError as exc:
                raise ConfigError(f"server.metrics_host/server.metrics_port: cannot listen on "
                                  f"{cfg.metrics_host}:{cfg.metrics_port} ({exc.strerror or exc})") from None
        await self.grpc.start()
        try:
            for front_end in self.front_ends:
                await front_end.start(self.service)
        except BaseException:
            await self._stop_front_ends()
            await self.grpc.stop(None)
            raise
        self.service.address = f"{host}:{bound}"
        log.info("epserve listening on %s:%d (tls=%s, auth=%s)", host, bound, self.service.tls, self.service.auth)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        stalls = asyncio.ensure_future(self.service.calls.watch_stalls(cfg.stalled_stream_timeout_s))
        busy = None
        try:
            if await self._load_engine():
                if cfg.log_interval_s:
                    busy = asyncio.ensure_future(BusyLog(self.engine, self.metrics, cfg.log_interval_s).run())
                await self._stop.wait()
            if busy is not None:
                busy.cancel()
            await self._shut_down()
        except BaseException:
            await self.grpc.stop(None)
            await self._stop_front_ends()
            if self._metrics_http is not None:
                await self._metrics_http.stop()
            if self.engine is not None:  # e.g. the warm-up failed: stop the engine's processes too
                await asyncio.to_thread(self.engine.shutdown)
            raise
        finally:
            stalls.cancel()
            if busy is not None:
                busy.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return self.exit_code

    async def _load_engine(self) -> bool:
        """Start the engine off the event loop (health stays answerable); False if stopped first."""
        if asyncio.iscoroutinefunction(self._start_engine):
            load = asyncio.ensure_future(self._start_engine(self.app))
        else:
            load = asyncio.ensure_future(asyncio.to_thread(self._start_engine, self.app))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not load.done():  # a signal while loading: let the load finish, then shut it down
            log.info("signal received while loading; stopping once the engine is up")
        self.engine = await load  # ConfigError and friends propagate to launch()
        self.service.attach(self.engine)
        loop = asyncio.get_running_loop()  # the callback runs on an engine thread when a rank dies
        self.engine.add_failure_callback(lambda reason: loop.call_soon_threadsafe(self._schedule_fail, reason))
        if self._stop.is_set():
            return False
        await self._warm_up()
        await self.state.set(Phase.SERVING)
        info = self.engine.model_info()
        log.info("serving model %s (%s, %d layers, %d experts, top-%d) with routing %s at ep_size=%d",
                 info.model_name, info.architecture, info.num_layers, info.num_experts, info.top_k,
                 info.routing_policy, info.ep_size)
        return True

    async def _warm_up(self) -> None:
        """One short greedy generation through every layer before health says SERVING (the
        first real request then pays no one-off costs), then zero the expert-load counters
        so that GetExpertLoad counts client traffic only."""
        start = time.perf_counter()
        request = GenerationRequest(request_id="warm-up", prompt_token_ids=(0, 0, 0, 0),
                                    sampling=SamplingParams(temperature=0.0),
                                    stops=StopParams(max_new_tokens=2, ignore_eos=True))
        async with aclosing(self.engine.generate(request)) as chunks:
            async for _ in chunks:
                pass
        await self.engine.expert_load(reset=True)
        log.info("warm-up generation done in %.0f ms", (time.perf_counter() - start) * 1000)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: draining (grace period %.1fs)", sig.name, self.app.server.grace_period_s)
            self._stop.set()
        else:
            n = self.service.calls.cancel_all("the server was stopped before this call finished")
            log.warning("%s again: cancelling %d call(s) now", sig.name, n)

    def _engine_unavailable(self, exc: Exception) -> None:
        """A call got EngineUnavailableError: if the engine is dead, fail now (its failure
        callback may still be on its way)."""
        if self.engine is not None and self.engine.failure is not None:
            self._schedule_fail(self.engine.failure)

    def _schedule_fail(self, reason: str) -> None:
        if self.state.phase is not Phase.FAILED:
            asyncio.get_running_loop().create_task(self.fail(reason))

    async def fail(self, reason: str) -> None:
        """The engine died: health NOT_SERVING, every call UNAVAILABLE, exit code 1."""
        if self.state.phase is Phase.FAILED:
            return
        log.error("the engine is gone (%s); shutting down with exit code %d", reason, EXIT_ENGINE_FAILED)
        await self.state.set(Phase.FAILED, reason)
        self.exit_code = EXIT_ENGINE_FAILED
        self.service.calls.cancel_all(f"the engine failed ({reason}); the server is exiting")
        self._stop.set()

    async def _shut_down(self) -> None:
        grace = self.app.server.grace_period_s
        if self.state.phase is not Phase.FAILED:
            await self.state.set(Phase.DRAINING)
            if not await self.service.calls.wait_idle(grace):
                n = self.service.calls.cancel_all(
                    f"the server shut down before this call finished (grace period {grace:g}s)")
                log.warning("grace period over: cancelled %d call(s)", n)
        await self.service.calls.wait_idle(5.0)
        await self.grpc.stop(1.0)  # ends health watches and anything left
        await self._stop_front_ends()
        if self.engine is not None:
            try:
                await asyncio.to_thread(self.engine.shutdown)  # joins the engine's threads and ranks
            except Exception:
                log.exception("engine shutdown failed")
                self.exit_code = self.exit_code or EXIT_ENGINE_FAILED
        if self._metrics_http is not None:
            await self._metrics_http.stop()
        log.info("epserve stopped (exit code %d)", self.exit_code)


    async def _stop_front_ends(self) -> None:
        for front_end in self.front_ends:
            await front_end.stop()


async def serve(app: AppConfig, start_engine: EngineFactory, front_ends: Sequence[ExtraFrontEnd] = ()) -> int:
    """Build the server inside the running loop (grpc.aio binds to it) and serve; exit code."""
    return await Server(app, start_engine, front_ends).run()
