"""The launch plan: everything the engine's processes need from the config, resolved once.

`build_launch_plan(app)` reads the model's spec and builds, against it, the routing policy,
the EPLB settings, the dispatch settings, the kernel choices (their environment overrides
applied and logged) and the effective max_model_len; every rule that can be checked without
loading weights is checked here and raises ConfigError naming the key. Rank 0 builds it (the
engine core, before any rank is spawned) and ships it to every rank (worker/rank.py);
nothing below re-reads the spec or re-checks a rule. `dry_run`, the benchmark and EPLB's
build_stats build the same plan.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

from .config import KERNEL_ENV, AppConfig, ConfigError, KernelConfig
from .dispatch_setup import build_dispatch_settings
from .eplb_setup import build_eplb_settings
from .routing_setup import build_routing_policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchPlan:
    app: AppConfig
    spec: Any  # server.model.spec.ModelSpec, as read once
    ep_size: int
    policy: Any  # the routing policy every rank starts with (RoutingPolicy)
    eplb: Any  # EplbSettings, or None: EPLB off
    dispatch: Any  # DispatchSettings
    kernels: KernelConfig  # the kernels.* keys, environment overrides applied
    max_model_len: int  # model.max_model_len, capped by the model's max_position_embeddings
    overrides: tuple[str, ...] = ()  # the environment overrides in effect, as logged

    def describe(self) -> str:
        """One line: what would be served (dry_run prints it)."""
        s, app = self.spec, self.app
        placed = ""
        if self.eplb is not None:
            source = f"from {self.eplb.stats_path}" if self.eplb.stats_path else "from even loads"
            every = f", rebalanced every {self.eplb.interval} steps" if self.eplb.interval else ""
            placed = (f", EPLB: {s.num_experts}+{self.eplb.redundant_experts} expert slots per layer placed {source} "
                      f"({self.eplb.policy}){every}")
        fp8 = "" if s.quantization is None else (f", FP8 {s.quantization.block[0]}x{s.quantization.block[1]} "
                                                 f"blocks dequantised to {s.dtype} on load")
        wire = " (fp8 rows on the all-gather)" if self.dispatch.wire == "fp8" else ""
        if fp8 and app.model.quantization in ("auto", "fp8"):  # server/model/expert_format.py decides per device
            fp8 += ", routed experts and FP8-stored dense linears kept FP8 where the FP8 kernels run (CUDA, Triton experts)"
        return (f"model={app.model.name} ({s.architecture}, {s.num_layers} layers, {s.num_experts} experts, "
                f"top-{s.top_k}{fp8}), routing policy {self.policy!r}, ep_size={self.ep_size}{placed}, "
                f"dispatch {self.dispatch.name}{wire}, kernels {self.kernels.backend}")


def read_spec(app: AppConfig):
    """The model's spec (config.json, or the configured shape), or ConfigError naming model.*."""
    from .model.loader import read_model_spec
    from .model.spec import ModelLoadError

    try:
        return read_model_spec(app.model)
    except (ModelLoadError, FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from exc


def build_launch_plan(app: AppConfig, ep_size: int | None = None, spec=None) -> LaunchPlan:
    """Resolve `app` for `ep_size` ranks (None: parallel.ep_size) -> LaunchPlan, or ConfigError.
    Loads no weights. `spec`: a spec read already (tools that read one from elsewhere)."""
    ep = app.parallel.ep_size if ep_size is None else ep_size
    spec = read_spec(app) if spec is None else spec
    policy = build_routing_policy(app.routing, num_experts=spec.num_experts, top_k=spec.top_k, ep_size=ep,
                                  num_layers=spec.num_moe_layers)
    eplb = build_eplb_settings(app.parallel, spec, ep)
    dispatch = build_dispatch_settings(app.parallel, app.engine, ep, hidden_size=spec.hidden_size)
    kernels, overrides = resolve_kernels(app.kernels)
    return LaunchPlan(app=app, spec=spec, ep_size=ep, policy=policy, eplb=eplb, dispatch=dispatch, kernels=kernels,
                      max_model_len=_max_model_len(app, spec), overrides=overrides)


def resolve_kernels(cfg: KernelConfig) -> tuple[KernelConfig, tuple[str, ...]]:
    """The kernels.* keys with their environment overrides applied (each logged), names checked
    against the kernel registries."""
    from .kernels.backend import KERNEL_BACKENDS, MLA_DECODE_BACKENDS
    from .kernels.mla_prefill_config import MLA_PREFILL_MODES
    from .moe.experts import EXPERT_PATHS

    changes: dict[str, Any] = {}
    notes = []
    for key, env in KERNEL_ENV.items():
        raw = os.environ.get(env, "").strip()
        if not raw:
            continue
        value: Any = raw != "0" if key == "cuda_graphs" else raw
        if value != getattr(cfg, key):
            changes[key] = value
            notes.append(f"{env}={raw} overrides kernels.{key}={getattr(cfg, key)!r}")
    for note in notes:
        log.warning("%s", note)
    cfg = replace(cfg, **changes)
    allowed = {"backend": ("auto", *KERNEL_BACKENDS), "expert_path": ("auto", *EXPERT_PATHS.names()),
               "mla_decode": MLA_DECODE_BACKENDS, "mla_prefill": tuple(MLA_PREFILL_MODES)}
    for key, names in allowed.items():
        if getattr(cfg, key) not in names:
            raise ConfigError(f"kernels.{key}={getattr(cfg, key)!r} (or {KERNEL_ENV[key]}) is not one of {list(names)}")
    return cfg, tuple(notes)


def _max_model_len(app: AppConfig, spec) -> int:
    max_model_len = app.model.max_model_len
    if spec.max_position_embeddings and max_model_len > spec.max_position_embeddings:
        log.warning("model.max_model_len=%d exceeds the model's max_position_embeddings=%d; using %d",
                    max_model_len, spec.max_position_embeddings, spec.max_position_embeddings)
        max_model_len = spec.max_position_embeddings
    cache_tokens = app.engine.kv_cache_tokens
    if max_model_len > cache_tokens:
        log.warning("max_model_len=%d exceeds one rank's KV cache (engine.kv_cache_tokens=%d): requests needing "
                    "more than the cache will be refused", max_model_len, cache_tokens)
    return max_model_len
