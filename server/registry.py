"""One small registry type for every name users or backends extend.

Router rules, routing policies, model families, kernel ops and their backends, expert paths
and attention backends are each one `Registry`: a name (plus aliases) -> entry map with a
decorator for registering, optional lazy "package.module:attribute" entries (imported on
first use, so a CPU install never imports triton), optional lazy discovery (entry-point
plugins are read only when a name is missing or the full list is asked for), and one error
for an unknown name that lists the names that exist.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")
_MISSING = object()


class UnknownNameError(KeyError):
    """A name no entry of a registry has; the message lists the names that do.

    Format: "<unknown> <kind> '<name>'[ for <scope>]; <known> <kinds>: a, b, c". Subclasses
    keep their own exception type (and may say "unsupported"/"supported" instead).
    """

    adjective = "unknown"
    listed = "known"

    def __init__(self, kind: str, name: str, known: Iterable[str], *, plural: str | None = None,
                 scope: str = "") -> None:
        super().__init__(name)
        self.kind, self.name, self.known = kind, name, sorted(known)
        self.plural = plural or f"{kind}s"
        self.scope = scope

    def __str__(self) -> str:
        where = f" for {self.scope}" if self.scope else ""
        names = ", ".join(self.known) or "(none)"
        return f"{self.adjective} {self.kind} {self.name!r}{where}; {self.listed} {self.plural}: {names}"


def load_target(target: str) -> Any:
    """"package.module:attribute" -> the attribute (imports the module)."""
    module, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"registry target {target!r} is not of the form 'package.module:attribute'")
    return getattr(importlib.import_module(module), attr)


def _describe(entry: Any) -> str:
    if isinstance(entry, str):
        return repr(entry)
    named = entry if hasattr(entry, "__qualname__") else type(entry)
    return f"{named.__module__}.{named.__qualname__}"


class Registry(Generic[T]):
    """name -> entry, with aliases; `kind` names what the entries are in messages.

    `error(name, known)` builds the exception for an unknown name (default UnknownNameError);
    `discover()` runs once, the first time a name is missing or every name is asked for;
    `lazy=True` entries are "package.module:attribute" strings, imported on first `get`.
    """

    def __init__(self, kind: str, *, plural: str | None = None, scope: str = "",
                 error: Callable[[str, list[str]], Exception] | None = None,
                 discover: Callable[[], None] | None = None, lazy: bool = False) -> None:
        self.kind, self.plural, self.scope = kind, plural, scope
        self._error, self._discover, self._lazy = error, discover, lazy
        self._discovered = discover is None
        self._entries: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}
        self._loaded: dict[str, T] = {}

    # ---- registering ----
    def register(self, name: str, entry: Any = _MISSING, *, aliases: tuple[str, ...] = ()) -> Any:
        """register(name, entry) adds an entry; register(name) is a decorator that adds what it decorates."""
        if entry is _MISSING:
            return lambda obj: self.register(name, obj, aliases=aliases)
        for key in (name, *aliases):
            owner = self._entries.get(self._aliases.get(key, key), _MISSING)
            if owner is not _MISSING and owner is not entry:
                raise ValueError(f"{self.kind} {key!r} is already registered by {_describe(owner)}")
        self._entries[name] = entry
        for alias in aliases:
            self._aliases[alias] = name
        return entry

    # ---- looking up ----
    def canonical(self, name: str) -> str:
        """The registered name behind `name` (itself, or what the alias points to)."""
        if name not in self._entries and name not in self._aliases:
            self._run_discovery()
        if name in self._aliases:
            return self._aliases[name]
        if name in self._entries:
            return name
        raise self.unknown(name)

    def get(self, name: str) -> T:
        key = self.canonical(name)
        if not self._lazy:
            return self._entries[key]
        if key not in self._loaded:
            self._loaded[key] = load_target(self._entries[key])
        return self._loaded[key]

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def names(self, discover: bool = True) -> list[str]:
        """Every selectable name, aliases and discovered plugins included, sorted
        (`discover=False`: only those registered so far; nothing is imported)."""
        if discover:
            self._run_discovery()
        return sorted([*self._entries, *self._aliases])

    def __iter__(self) -> Iterator[str]:
        """Registered names (no aliases) in registration order."""
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def unknown(self, name: str) -> Exception:
        """The exception for a name that is not registered."""
        known = self.names()
        if self._error is not None:
            return self._error(name, known)
        return UnknownNameError(self.kind, name, known, plural=self.plural, scope=self.scope)

    def _run_discovery(self) -> None:
        if not self._discovered:
            self._discovered = True
            self._discover()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
