"""source=profile: a named skew profile (conf/routing_profile/<name>.yaml) as the router.

A profile is the `skewed` policy's popularity model with its parameters and, in comments,
the published figure it reproduces:

  mode           zipf | lognormal | power_law
  metric, target solve the shape so the expected loads read `target` in `metric`
                 (rank_balancedness, max_vio, expert_max_over_mean) ...
  calibrated_ep  ... at this EP size (the size the figure was measured at)
  shape          or use this shape as given (a published power-law alpha): nothing solved
  seed           which seeded popularity per layer

The solved popularity does not change with the simulated EP size: a figure measured at EP32
implies milder rank imbalance at EP8 and worse at EP64, as the same router would show.
bench.profile names a file in conf/routing_profile or gives a path to one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import conf

from ...config import ConfigError
from ...moe.routing import PolicyConfigError, build_policy
from .named_yaml import read_named_yaml, shipped
from .sources import PolicySource, SourceRequest, run_offsets

PROFILE_DIR = Path(conf.__file__).resolve().parent / "routing_profile"
_KEYS = {"mode", "metric", "target", "calibrated_ep", "shape", "seed"}


def available_profiles() -> list[str]:
    return shipped(PROFILE_DIR)


def read_profile(name: str) -> dict[str, Any]:
    """The profile's keys from conf/routing_profile/<name>.yaml, or from a path; ConfigError if bad."""
    path, data = read_named_yaml(name, PROFILE_DIR, "bench.profile")
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"bench.profile {path}: expected a mapping of {sorted(_KEYS)}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"bench.profile {path}: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    return {**data, "path": str(path)}


def build_profile_source(req: SourceRequest) -> PolicySource:
    name = req.settings.bench.profile
    if not name:
        raise ConfigError(f"bench.routing_source=profile needs bench.profile (shipped: {', '.join(available_profiles())})")
    prof = read_profile(name)
    spec = req.spec
    calibrated = int(prof.get("calibrated_ep") or req.settings.ep_size)
    if spec.num_experts % calibrated:
        raise ConfigError(f"bench.profile {name}: calibrated_ep={calibrated} does not divide the model's "
                          f"{spec.num_experts} experts")
    params = {k: prof[k] for k in ("mode", "metric", "target", "shape", "seed") if k in prof}
    try:
        policy = build_policy("skewed", **params)
        policy.validate(spec.num_experts, spec.top_k, calibrated, spec.num_moe_layers)
    except PolicyConfigError as exc:
        raise ConfigError(f"bench.profile {name}: {exc}") from None
    what = (f"{prof['mode']} alpha {prof['shape']}" if "shape" in prof
            else f"{prof['mode']}, {prof.get('metric', 'expert_max_over_mean')} {prof.get('target')} at EP{calibrated}")
    return PolicySource(policy, spec.num_experts, spec.top_k, calibrated, run_offsets(req.steps), req.device,
                        f"profile {Path(prof['path']).stem} ({what})")
