"""`--help` and `--version` of the Hydra entry points (`epserve`, `epserve-bench`).

Hydra's own --help prints the composed YAML with no word on what a key means or which options a
group has. The comments in conf/ already say both, so --help composes the config as the given
overrides would (`epserve --help routing=skewed` shows skewed's keys), then lists every group
with its options (the chosen one starred) and every key with its value and the one-line comment
written beside or above it in conf/. Secrets print as <redacted>. --version prints epserve's
version (Hydra's own is still there as --hydra-help's neighbour, not needed by users).
"""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any, Iterable

from .command_line import CONF_DIR, REDACTED, SECRET_KEYS

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")
_FLAGS = (
    ("-h, --help", "this text: groups, their options and every key with its meaning"),
    ("--version", "print epserve's version"),
    ("--cfg job", "print the resolved config (YAML) and exit"),
    ("--info", "Hydra's view of the composition (search path, defaults tree)"),
    ("--hydra-help", "Hydra's own help (multirun -m, shell completion)"),
)


def epserve_version() -> str:
    try:
        return importlib.metadata.version("epserve")
    except importlib.metadata.PackageNotFoundError:  # a source tree run without installing
        text = (CONF_DIR.parent / "pyproject.toml").read_text()
        return re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)


def yaml_comments(path: Path, prefix: str = "") -> dict[str, str]:
    """dotted key -> its description: the comment on its own line, else the comment block just
    above it (first line), for every key of a conf/ YAML file."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    above: list[str] = []
    seen_key = False  # the comment block before the first key describes the file, not the key
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = _KEY_LINE.match(raw)
        if match and match.group("key") == "defaults":
            above, seen_key = [], True
            continue
        if not match:
            above = [] if not stripped.startswith("-") else above
            continue
        indent = len(match.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [match.group("key")])
        rest = match.group("rest")
        trailing = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        block = " ".join(above) if seen_key and indent == 0 else ""
        note = trailing or (block if len(block) <= 110 else block[:block.rfind(" ", 0, 107)] + " ...")
        out[f"{prefix}{dotted}"] = note
        if not rest.split("#", 1)[0].strip():
            stack.append((indent, match.group("key")))
        above, seen_key = [], True
    return out


def _flatten(node: Any, prefix: str = "", depth: int = 0) -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict) and (depth < 2 or not node) and not prefix.endswith("shape"):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key), depth + 1)
    elif isinstance(node, dict):
        yield prefix, f"{{{len(node)} keys}}"
    else:
        yield prefix, node


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def help_text(app: str, conf_dir: Path, config_name: str, overrides: list[str],
              group_dirs: tuple[Path, ...] = (CONF_DIR,)) -> str:
    """The --help page of `app` for the config `config_name` of `conf_dir` with `overrides`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    comments = yaml_comments(conf_dir / f"{config_name}.yaml")
    groups = []
    for group, choice in sorted(choices.items()):
        folder = next((d / group for d in group_dirs if (d / group).is_dir()), None)
        if group.startswith("hydra") or folder is None:
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        groups.append(f"  {group}=  " + ", ".join(f"{o}*" if o == choice else o for o in options))
        if choice and (folder / f"{choice}.yaml").is_file():
            comments.update({k: v for k, v in yaml_comments(folder / f"{choice}.yaml", f"{group}.").items() if v})
        for option in options:  # a key the chosen file leaves bare: what another option says of it
            for key, note in yaml_comments(folder / f"{option}.yaml", f"{group}.").items():
                comments[key] = comments.get(key) or note
    lines = [f"{app} {epserve_version()}", "", f"Usage: {app} [flags] [group=option ...] [key=value ...]", "",
             "Flags:"]
    lines += [f"  {flag:<14} {what}" for flag, what in _FLAGS]
    lines += ["", "Groups (* = chosen; pick another with group=option):", *groups, "",
              "Keys (override with key=value; value as composed now, then what it means):"]
    for key, value in _flatten(tree):
        shown = REDACTED if key.split(".")[-1] in SECRET_KEYS and value not in (None, "") else _yaml(value)
        note = comments.get(key, "")
        lines.append(f"  {key}={shown}" + (f"    # {note}" if note else ""))
    return "\n".join(lines) + "\n"
