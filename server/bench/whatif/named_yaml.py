"""Profiles the what-if reads by name (a YAML file shipped in conf/) or by path."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ...config import ConfigError


def shipped(folder: Path) -> list[str]:
    """Names of the profiles shipped in `folder` (<name>.yaml)."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def read_named_yaml(name: str, folder: Path, key: str) -> tuple[Path, Any]:
    """`name`: a path to a YAML file, or a profile shipped in `folder` -> (its path, its parsed
    content). ConfigError naming the setting `key` and listing the shipped names otherwise."""
    path = Path(name).expanduser()
    if not path.is_file():
        path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{key}={name!r} is neither a file nor a shipped profile; shipped: {', '.join(shipped(folder))}")
    try:
        return path, yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: {path} is not valid YAML ({exc})") from None
