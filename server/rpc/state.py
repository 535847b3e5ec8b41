"""The server's lifecycle, mirrored into grpc.health.v1.

LOADING -> SERVING -> DRAINING (SIGTERM/SIGINT) or FAILED (engine died). Health reports
SERVING only in SERVING, for the whole server ("") and for epserve.v1.GenerationService.
"""
from __future__ import annotations

import enum
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from clients.pb import info_pb2 as info_pb

SERVICE_NAME = "epserve.v1.GenerationService"
log = logging.getLogger(__name__)


class Phase(enum.Enum):
    LOADING = info_pb.SERVING_STATE_LOADING
    SERVING = info_pb.SERVING_STATE_SERVING
    DRAINING = info_pb.SERVING_STATE_DRAINING
    FAILED = info_pb.SERVING_STATE_FAILED


# Why generation calls are refused in each phase other than SERVING (-> UNAVAILABLE).
UNAVAILABLE_REASON = {
    Phase.LOADING: "the server is still loading the model; retry shortly",
    Phase.DRAINING: "the server is shutting down and takes no new calls",
    Phase.FAILED: "the engine failed; the server is exiting",
}


class ServingState:
    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self.health = HealthServicer()
        self.failure: str | None = None

    async def start(self) -> None:
        """Publish NOT_SERVING before the port opens (the servicer starts out SERVING)."""
        await self._publish()

    async def set(self, phase: Phase, reason: str | None = None) -> None:
        if self.phase in (Phase.FAILED,) or self.phase == phase:
            return  # FAILED is final
        if phase is Phase.SERVING and self.phase is not Phase.LOADING:
            return  # never back to SERVING once draining
        log.info("serving state %s -> %s%s", self.phase.name, phase.name, f" ({reason})" if reason else "")
        self.phase = phase
        if phase is Phase.FAILED:
            self.failure = reason
        await self._publish()

    async def _publish(self) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if self.phase is Phase.SERVING
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING

    def unavailable_reason(self) -> str:
        reason = UNAVAILABLE_REASON.get(self.phase, "")
        return f"{reason}: {self.failure}" if self.phase is Phase.FAILED and self.failure else reason
