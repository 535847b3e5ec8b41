"""Turn `parallel.dispatch*` keys into dispatch settings checked against the EP size (and, for
the fp8 wire, the model's hidden size).

Called before any rank is spawned (launcher) so a wrong name stops the server with a
ConfigError listing the dispatchers that exist, and again on every rank to build the same
dispatcher (server/moe/dispatch/).
"""
from __future__ import annotations

from .config import ConfigError, EngineConfig, ParallelConfig
from .moe.dispatch import DISPATCHERS, WIRES, DispatchSettings
from .moe.dispatch.fp8_rows import GROUP as FP8_GROUP

#: dispatchers that run collectives at ep_size 1 too (over a size-1 process group)
GROUP_AT_EP1 = ("allgather", "alltoall")


def build_dispatch_settings(parallel: ParallelConfig, engine: EngineConfig, ep_size: int,
                            hidden_size: int | None = None) -> DispatchSettings:
    """`hidden_size`: the model's (None: not known yet; the fp8 wire's group check waits)."""
    name = parallel.dispatch
    if name not in DISPATCHERS:
        raise ConfigError(f"parallel.dispatch={name!r} is not one of {sorted(DISPATCHERS)}")
    if name == "local" and ep_size != 1:
        raise ConfigError(f"parallel.dispatch=local keeps every expert on one rank; parallel.ep_size={ep_size} "
                          "needs auto, allgather or alltoall")
    wire = parallel.dispatch_wire
    if wire not in WIRES:
        raise ConfigError(f"parallel.dispatch_wire={wire!r} is not one of {list(WIRES)}")
    if wire == "fp8" and name in ("alltoall", "local"):
        raise ConfigError(f"parallel.dispatch_wire=fp8 applies to the fixed-capacity path (parallel.dispatch="
                          f"allgather or auto); parallel.dispatch={name} never sends FP8 rows")
    if wire == "fp8" and hidden_size is not None and hidden_size % FP8_GROUP:
        raise ConfigError(f"parallel.dispatch_wire=fp8 scales each {FP8_GROUP}-channel group of a hidden row; "
                          f"the model's hidden_size {hidden_size} is not a multiple of {FP8_GROUP} (use bf16)")
    # A rank's step holds at most its decodes plus one prefill chunk's tokens.
    bound = parallel.dispatch_fixed_max_rows or engine.max_num_batched_tokens + engine.max_num_seqs
    return DispatchSettings(name=name, fixed_max_rows=bound, wire=wire)


def needs_group_at_ep1(settings: DispatchSettings) -> bool:
    """The forced EP path at ep_size 1 runs over a real size-1 process group."""
    return settings.name in GROUP_AT_EP1
