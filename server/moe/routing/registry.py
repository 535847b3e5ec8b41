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

from .base import PolicyConfigError, RoutingPolicy

ENTRY_POINT_GROUP = "epserve.routing_policies"
log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[RoutingPolicy]] = {}
_ALIASES: dict[str, str] = {}
_PLUGINS_LOADED = False


class UnknownPolicyError(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown routing policy {self.name!r}; known policies: {', '.join(self.known)}"


def register_policy(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: make a RoutingPolicy subclass selectable as `routing=<name>`."""

    def decorate(cls: type) -> type:
        if not (inspect.isclass(cls) and issubclass(cls, RoutingPolicy)):
            raise TypeError(f"@register_policy({name!r}) expects a RoutingPolicy subclass, got {cls!r}")
        for key in (name, *aliases):
            owner = _REGISTRY.get(key) or _REGISTRY.get(_ALIASES.get(key, ""))
            if owner is not None and owner is not cls:
                raise ValueError(f"routing policy name {key!r} is already registered by {owner.__module__}.{owner.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return decorate


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()  # importing the module usually registers the policy itself
        except Exception as exc:  # a broken plugin must not take the server down
            log.error("routing plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        if ep.name not in _REGISTRY and ep.name not in _ALIASES:
            register_policy(ep.name)(obj)


def canonical_name(name: str) -> str:
    """Resolve an alias (`fake_balance`) to the policy's registered name (`greedy_balanced`)."""
    if name not in _REGISTRY and name not in _ALIASES:
        _load_plugins()
    if name in _ALIASES:
        return _ALIASES[name]
    if name in _REGISTRY:
        return name
    raise UnknownPolicyError(name, available_policies())


def available_policies() -> list[str]:
    """Every selectable name, aliases included, plugins included."""
    _load_plugins()
    return sorted([*_REGISTRY, *_ALIASES])


def get_policy_class(name: str) -> type[RoutingPolicy]:
    return _REGISTRY[canonical_name(name)]


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
