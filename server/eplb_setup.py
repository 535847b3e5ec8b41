"""Turn `parallel.*` EPLB keys into settings checked against the served model's shape.

Called before any rank is spawned (launcher, dry run) so an impossible combination stops the
server with a ConfigError naming the keys, and again on every rank to build the same
start-up placement (server/moe/eplb/settings.py).
"""
from __future__ import annotations

from .config import ConfigError, ParallelConfig
from .moe.eplb.settings import EplbConfigError, EplbSettings, resolve_eplb


def build_eplb_settings(parallel: ParallelConfig, spec, ep_size: int) -> EplbSettings | None:
    """None when no EPLB key is set; else settings for this model (spec: ModelSpec) at ep_size."""
    try:
        return resolve_eplb(parallel, num_layers=spec.num_moe_layers, num_experts=spec.num_experts, ep_size=ep_size,
                            model_groups=getattr(spec, "num_expert_groups", 1) or 1)
    except EplbConfigError as exc:
        raise ConfigError(str(exc)) from None
