"""The epserve.v1.GenerationService servicer (grpc.aio)."""
from __future__ import annotations

import asyncio
import importlib.metadata
from concurrent.futures import ThreadPoolExecutor
import logging
import time
from dataclasses import dataclass
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from clients.pb import abort_pb2
from clients.pb import generation_pb2 as gen_pb
from clients.pb import info_pb2 as info_pb
from clients.pb import routing_pb2 as routing_pb
from server.config import AppConfig
from server.engine.api import Engine, EngineUnavailableError, InvalidPolicyError, RoutingPolicyState

from .active_calls import ActiveCalls
from .generation_call import run_generation, stream_writer
from .metrics import EngineSample, ServerMetrics
from .received import ReceivedRequest, parse_generate_request
from .reply_size import UnaryReply
from .state import SERVICE_NAME, Phase, ServingState
from .routing_request import routing_mapping
from .to_proto import expert_load_to_pb, model_info_to_pb, routing_policy_to_pb
from .validation import RequestLimits

log = logging.getLogger(__name__)


def server_version() -> str:
    try:
        return importlib.metadata.version("epserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


@dataclass(frozen=True)
class Undecodable:
    """What a unary info method receives when its bytes do not parse."""

    reason: str


def tolerant_parser(request_cls) -> Callable[[bytes], object]:
    """A request deserializer that never raises. grpc turns a raising deserializer into
    UNKNOWN with an ERROR traceback in the log for every call, so garbage could flood the log.
    Returning a marker lets the method answer INVALID_ARGUMENT instead, silently (the auth
    interceptor's denying handlers parse nothing, so a caller without the token still gets
    UNAUTHENTICATED first)."""
    def parse(data: bytes) -> object:
        try:
            return request_cls.FromString(data)
        except DecodeError as exc:
            return Undecodable(f"request: not a valid {request_cls.DESCRIPTOR.full_name} ({exc})")

    return parse


class GenerationService:
    """Holds what every call needs; the engine is attached once it is warm."""

    def __init__(self, app: AppConfig, state: ServingState, metrics: ServerMetrics,
                 on_engine_unavailable: Callable[[Exception], None], tls: bool, auth: bool) -> None:
        self.app, self.state, self.metrics = app, state, metrics
        self.engine: Engine | None = None
        self.limits: RequestLimits | None = None
        self.calls = ActiveCalls(app.server.max_concurrent_streams, app.server.max_calls_per_connection)
        # One thread tokenizes text prompts (HF tokenizers are not safe to share across threads).
        self.tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="epserve-tokenize")
        self._on_engine_unavailable = on_engine_unavailable
        self._model_info: info_pb.ModelInfo | None = None
        self.tls, self.auth = tls, auth
        self._started = self._load_window_start = time.monotonic()
        self._switching = asyncio.Lock()  # one policy switch at a time
        self.address = f"{app.server.host}:{app.server.port}"  # the bound address, once listening

    def attach(self, engine: Engine) -> None:
        info = engine.model_info()
        self.engine = engine
        self.limits = RequestLimits(vocab_size=engine.vocab_size, max_model_len=info.max_model_len,
                                    max_prompt_bytes=self.app.server.max_prompt_bytes)
        self._model_info = model_info_to_pb(info, engine.routing_policy())
        self._load_window_start = time.monotonic()

    def engine_unavailable(self, exc: Exception) -> None:
        self._on_engine_unavailable(exc)

    # -- generation ------------------------------------------------------------------------
    async def Generate(self, received: ReceivedRequest, context: grpc.aio.ServicerContext) -> gen_pb.GenerateResponse:
        reply = UnaryReply(self.app.server.max_message_bytes)  # merged and size-checked (reply_size.py)
        await run_generation(self, received, context, "Generate", reply.add)
        return reply.result()

    async def GenerateStream(self, received: ReceivedRequest, context: grpc.aio.ServicerContext) -> None:
        await run_generation(self, received, context, "GenerateStream", stream_writer(self, context))

    async def Abort(self, request: abort_pb2.AbortRequest, context) -> abort_pb2.AbortResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        aborted = self.calls.abort(request.request_id)
        if not aborted:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"request_id: no generation call {request.request_id!r} is in progress")
        log.info("Abort(%r) ended %d call(s)", request.request_id, aborted)
        return abort_pb2.AbortResponse(aborted=aborted)

    # -- inspection ------------------------------------------------------------------------
    async def _require_engine(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.engine is None or self.state.phase in (Phase.LOADING, Phase.FAILED):
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.state.unavailable_reason())
        return self.engine  # type: ignore[return-value]

    async def GetModelInfo(self, request: info_pb.GetModelInfoRequest, context) -> info_pb.ModelInfo:
        engine = await self._require_engine(context)
        reply = info_pb.ModelInfo()
        reply.CopyFrom(self._model_info)
        reply.routing.CopyFrom(routing_policy_to_pb(engine.routing_policy()))  # as of the last switch
        return reply

    # -- routing control -------------------------------------------------------------------
    async def GetRoutingPolicy(self, request: routing_pb.GetRoutingPolicyRequest, context) -> info_pb.RoutingPolicyInfo:
        engine = await self._require_engine(context)
        return routing_policy_to_pb(engine.routing_policy())

    async def SetRoutingPolicy(self, request: routing_pb.SetRoutingPolicyRequest, context) -> info_pb.RoutingPolicyInfo:
        if not self.app.server.allow_routing_switch:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "switching the routing policy is off: start the server with server.allow_routing_switch=true")
        engine = await self._require_engine(context)
        try:
            routing = routing_mapping(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        async with self._switching:
            try:
                state = await engine.set_routing_policy(routing)
            except InvalidPolicyError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except EngineUnavailableError as exc:
                self.engine_unavailable(exc)
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc) or "the engine is unavailable")
            self._counters_reset(state)
        log.info("routing policy switched to %s %s", state.name, dict(state.params))
        return routing_policy_to_pb(state)

    def _counters_reset(self, state: RoutingPolicyState) -> None:
        """The switch zeroed the load counters: GetExpertLoad's window starts there."""
        self._load_window_start = time.monotonic() - max(0.0, time.time() - state.counters_reset_unix_s)

    async def GetExpertLoad(self, request: info_pb.GetExpertLoadRequest, context) -> info_pb.ExpertLoad:
        engine = await self._require_engine(context)
        try:
            snap = await engine.expert_load(reset=request.reset)
        except EngineUnavailableError as exc:
            self.engine_unavailable(exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc) or "the engine is unavailable")
        except Exception:
            log.exception("GetExpertLoad(reset=%s) failed", request.reset)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error reading expert load; see the server log")
        now = time.monotonic()
        reply = expert_load_to_pb(snap, now - self._load_window_start, request.reset)
        if request.reset:
            self._load_window_start = now
        return reply

    async def GetServerInfo(self, request: info_pb.GetServerInfoRequest, context) -> info_pb.ServerInfo:
        cfg, stats = self.app.server, None
        if self.engine is not None and self.state.phase is not Phase.FAILED:
            try:
                stats = self.engine.stats()
            except Exception:
                log.exception("engine.stats() failed")
        prompt_tokens, completion_tokens = self.metrics.totals()
        info = info_pb.ServerInfo(
            version=server_version(), uptime_s=time.monotonic() - self._started, state=self.state.phase.value,
            config=info_pb.ServerConfigSummary(
                address=self.address, tls=self.tls, auth=self.auth, metrics_port=cfg.metrics_port,
                max_concurrent_streams=cfg.max_concurrent_streams, max_message_bytes=cfg.max_message_bytes,
                grace_period_s=cfg.grace_period_s, max_num_seqs=self.app.engine.max_num_seqs,
                max_queue=self.app.engine.max_queue, kv_cache_tokens=self.app.engine.kv_cache_tokens,
                routing_policy=self._model_info.routing.name if self._model_info else self.app.routing.name,
                ep_size=self.app.parallel.ep_size, model_name=self.app.model.name,
            ),
            stats=info_pb.ServerStats(
                active_calls=len(self.calls), requests_by_code=self.metrics.requests_by_code(),
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            ),
        )
        if stats is not None:
            info.stats.running_sequences, info.stats.waiting_sequences = stats.running, stats.waiting
            info.stats.kv_blocks_used, info.stats.kv_blocks_total = stats.kv_blocks_used, stats.kv_blocks_total
            info.stats.engine_steps = stats.steps
        return info

    async def sample_for_metrics(self) -> EngineSample:
        """Engine gauges for a Prometheus scrape (runs on the server's event loop)."""
        if self.engine is None or self.state.phase is Phase.FAILED:
            return EngineSample(None, None, self.state.phase.name)
        return EngineSample(self.engine.stats(), await self.engine.expert_load(reset=False), self.state.phase.name)

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        def unary(fn, request_cls):
            async def call(request, context):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                return await fn(request, context)

            return grpc.unary_unary_rpc_method_handler(
                call, request_deserializer=tolerant_parser(request_cls), response_serializer=lambda m: m.SerializeToString())

        serialize = gen_pb.GenerateResponse.SerializeToString
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Generate": grpc.unary_unary_rpc_method_handler(
                self.Generate, request_deserializer=parse_generate_request, response_serializer=serialize),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.GenerateStream, request_deserializer=parse_generate_request, response_serializer=serialize),
            "Abort": unary(self.Abort, abort_pb2.AbortRequest),
            "GetModelInfo": unary(self.GetModelInfo, info_pb.GetModelInfoRequest),
            "GetExpertLoad": unary(self.GetExpertLoad, info_pb.GetExpertLoadRequest),
            "GetServerInfo": unary(self.GetServerInfo, info_pb.GetServerInfoRequest),
            "GetRoutingPolicy": unary(self.GetRoutingPolicy, routing_pb.GetRoutingPolicyRequest),
            "SetRoutingPolicy": unary(self.SetRoutingPolicy, routing_pb.SetRoutingPolicyRequest),
        })
