"""Architecture name (config.json `architectures[0]`) -> MoE family.

Families register with `@register_family("XForCausalLM", ...)`; adding a family is one new
module plus an import in __init__.py. An unknown architecture fails with the list of
supported ones.
"""
from __future__ import annotations

from typing import Callable

from ...registry import Registry, UnknownNameError
from ..spec import ModelLoadError
from .base import MoEFamily


class UnsupportedArchitectureError(ModelLoadError, UnknownNameError):
    """config.json names an architecture no family serves; the message lists those that exist."""

    adjective, listed = "unsupported", "supported"

    def __init__(self, architecture: str, known: list[str] | None = None) -> None:
        UnknownNameError.__init__(self, "architecture", architecture,
                                  supported_architectures() if known is None else known)
        self.architecture = architecture


#: config.json `architectures[0]` -> the family instance that parses and loads it
FAMILIES: Registry[MoEFamily] = Registry("architecture", error=UnsupportedArchitectureError)


def register_family(*architectures: str) -> Callable[[type[MoEFamily]], type[MoEFamily]]:
    """Class decorator: one instance of the family serves every architecture name given."""

    def decorate(cls: type[MoEFamily]) -> type[MoEFamily]:
        instance = cls()
        for arch in architectures:
            FAMILIES.register(arch, instance)
        return cls

    return decorate


def get_family(architecture: str) -> MoEFamily:
    return FAMILIES[architecture]


def supported_architectures() -> list[str]:
    return FAMILIES.names()
