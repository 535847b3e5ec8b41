"""Name -> routing policy registry, with lazy discovery of third-party plugins.

Built-in policies register with the `register_policy` decorator when their module is
imported. Third-party packages declare an entry point in the group `epserve.routing_policies`
(`name = "pkg.module:PolicyClass"`); entry points are read only when a name is not found among
the built-ins or when the full list is asked for, so start-up does not import every plugin.
Policies are only ever selected by registered name: config cannot name an arbitrary class.
"""
from __future__ import annotations

import inspect
import logging
from importlib.metadata import entry_points
from typing import Any, Callable

from ...registry import Registry, UnknownNameError
from .base import PolicyConfigError, RoutingPolicy

ENTRY_POINT_GROUP = "epserve.routing_policies"
log = logging.getLogger(__name__)


class UnknownPolicyError(UnknownNameError):
    """`routing.name` names no registered policy, alias or plugin; the message lists those that exist."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__("routing policy", name, known, plural="routing policies")


def _load_plugins() -> None:
    """Import every `epserve.routing_policies` entry point (once, when a name is missing)."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()  # importing the module usually registers the policy itself
        except Exception as exc:  # a broken plugin must not take the server down
            log.error("routing plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        if ep.name not in POLICIES:
            register_policy(ep.name)(obj)


#: policy name or alias -> RoutingPolicy subclass
POLICIES: Registry[type[RoutingPolicy]] = Registry("routing policy", plural="routing policies",
                                                   error=UnknownPolicyError, discover=_load_plugins)


def register_policy(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: make a RoutingPolicy subclass selectable as `routing=<name>`."""

    def decorate(cls: type) -> type:
        if not (inspect.isclass(cls) and issubclass(cls, RoutingPolicy)):
            raise TypeError(f"@register_policy({name!r}) expects a RoutingPolicy subclass, got {cls!r}")
        POLICIES.register(name, cls, aliases=aliases)
        cls.name = name
        return cls

    return decorate


def canonical_name(name: str) -> str:
    """Resolve an alias (`fake_balance`) to the policy's registered name (`greedy_balanced`)."""
    return POLICIES.canonical(name)


def available_policies() -> list[str]:
    """Every selectable name, aliases included, plugins included."""
    return POLICIES.names()


def get_policy_class(name: str) -> type[RoutingPolicy]:
    return POLICIES[name]


def build_policy(name: str, **params: Any) -> RoutingPolicy:
    """Build a policy by registered name (or alias) from keyword parameters.

    Unknown parameter names raise PolicyConfigError naming them and the accepted ones.
    """
    cls = get_policy_class(name)
    accepted = _accepted_params(cls)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise PolicyConfigError(
            f"routing policy {cls.name!r} got unknown parameter(s) {unknown}; accepted: {sorted(accepted)}"
        )
    return cls(**params)


def _accepted_params(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                names.add(p.name)
    return names
