"""Architecture name (config.json `architectures[0]`) -> MoE family.

Families register with `@register_family("XForCausalLM", ...)`; adding a family is one new
module plus an import in __init__.py. An unknown architecture fails with the list of
supported ones.
"""
from __future__ import annotations

from typing import Callable

from ..spec import ModelLoadError
from .base import MoEFamily

_FAMILIES: dict[str, MoEFamily] = {}


class UnsupportedArchitectureError(ModelLoadError):
    def __init__(self, architecture: str) -> None:
        super().__init__(
            f"unsupported architecture {architecture!r}; supported architectures: {', '.join(supported_architectures())}"
        )
        self.architecture = architecture


def register_family(*architectures: str) -> Callable[[type[MoEFamily]], type[MoEFamily]]:
    def decorate(cls: type[MoEFamily]) -> type[MoEFamily]:
        instance = cls()
        for arch in architectures:
            if arch in _FAMILIES:
                raise ValueError(f"architecture {arch!r} is already registered by {type(_FAMILIES[arch]).__name__}")
            _FAMILIES[arch] = instance
        return cls

    return decorate


def get_family(architecture: str) -> MoEFamily:
    family = _FAMILIES.get(architecture)
    if family is None:
        raise UnsupportedArchitectureError(architecture)
    return family


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)
