"""What the Hydra entry point adds around Hydra's own command line.

* An unknown option of a config group (`routing=nope`, `parallel=ep3`) is one paragraph that
  lists the options that exist, exit code 2, like every other configuration error. Hydra's
  own report is several lines, a search-path dump and exit code 1. The options are the
  `*.yaml` files of the group's folder in conf/; with --config-dir/--config-path/--config-name
  other folders may add options, so the check then leaves the verdict to Hydra.
* A key that does not exist (`server.prot=50053`) is one paragraph with the nearest key that
  does ("did you mean server.port"), exit 2; Hydra's own report says "not in struct" and
  suggests `+server.prot`, which would only make the typo silent. An unknown `--flag` the same.
* Hydra prints the composed config for --cfg, --help and --info. A bearer token set with
  `server.auth_token` would appear in clear in that output (and in whatever log or CI
  transcript keeps it), so those modes run with stdout captured and every `auth_token:` value
  replaced by '<redacted>', and so is the override as Hydra echoes it (hydra.overrides,
  hydra.job.override_dirname). `server.auth_token_env` (the name of an environment variable)
  keeps the token out of the config altogether.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import re
import sys
from pathlib import Path
from typing import Callable

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SECRET_KEYS = ("auth_token",)
REDACTED = "'<redacted>'"
_SHOW_FLAGS = ("--cfg", "-c", "--help", "-h", "--info", "-i")
_OTHER_CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")
_SECRET_LINE = re.compile(rf"^(?P<indent> *)(?:- )?(?P<key>{'|'.join(SECRET_KEYS)}):(?P<value>.*)$")
_SECRET_OVERRIDE = re.compile(rf"(?<![\w])(?P<key>(?:[\w.]*\.)?(?:{'|'.join(SECRET_KEYS)}))=")  # hydra.overrides, override_dirname
_EMPTY = ("null", "~", "''", '""', "")


def _flag(arg: str) -> str:
    return arg.split("=", 1)[0] if arg.startswith("-") else ""


def _overrides(argv: list[str]) -> list | None:
    """argv's `key=value` overrides as Hydra parses them; None where another config is named
    (--config-name and the like: other keys apply) or Hydra's grammar refuses them (it says so)."""
    if any(_flag(a) in _OTHER_CONFIG_FLAGS for a in argv):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        return OverridesParser.create().parse_overrides(candidates)
    except Exception:  # a grammar error: Hydra reports it itself
        return None


def unknown_group_option(argv: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """The error for the first `group=option` naming an option the group does not have, else None."""
    overrides = _overrides(argv)
    if overrides is None:
        return None
    for o in overrides:
        folder = conf_dir / o.key_or_group
        if o.is_delete() or o.is_sweep_override() or o.value() is None or not folder.is_dir():
            continue
        option = o.get_value_element_as_str()
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        if option not in options:
            return (f"{o.key_or_group}={option}: config group '{o.key_or_group}' has no option {option!r}; "
                    f"the options are: {', '.join(options)}")
    return None


def unknown_flag(argv: list[str], extra_flags: tuple[str, ...] = ()) -> str | None:
    """The error for the first `--flag` neither Hydra nor the entry point knows, else None."""
    from hydra._internal.utils import get_args_parser

    known = [s for action in get_args_parser()._actions for s in action.option_strings] + list(extra_flags)
    for arg in argv:
        flag = _flag(arg)
        if flag and flag not in known:
            near = difflib.get_close_matches(flag, [k for k in known if k.startswith("--")], n=1, cutoff=0.7)
            hint = f"; did you mean {near[0]}" if near else ""
            return f"{flag}: no such option{hint} (--help lists the options, groups and keys)"
    return None


def unknown_key(argv: list[str], conf_dir: Path = CONF_DIR, config_name: str = "config") -> str | None:
    """The error for the first `key=value` override naming a key the composed config lacks
    (Hydra would refuse it too), with the nearest existing key, else None."""
    overrides = _overrides(argv)
    if overrides is None:
        return None
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    plain = [o for o in overrides if not o.is_force_add() and not o.is_add() and not o.is_delete()
             and not o.key_or_group.startswith("hydra") and not _is_group(o.key_or_group, conf_dir)]
    if not plain:
        return None
    groups = [o.input_line for o in overrides if o not in plain]
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            tree = OmegaConf.to_container(compose(config_name=config_name, overrides=groups), resolve=False)
    except Exception:  # Hydra reports a bad composition itself
        return None
    keys = list(_dotted_keys(tree))
    for o in plain:
        node, path = tree, o.key_or_group.split(".")
        for part in path:
            if not isinstance(node, dict) or part not in node:
                near = difflib.get_close_matches(o.key_or_group, keys, n=1, cutoff=0.6)
                hint = f"; did you mean {near[0]}?" if near else ""
                return (f"{o.input_line}: there is no key {o.key_or_group}{hint} "
                        "(--help lists every key; +key=value adds a new one)")
            node = node[part]
    return None


def _is_group(name: str, conf_dir: Path) -> bool:
    return (conf_dir / name).is_dir() or (CONF_DIR / name).is_dir()


def _dotted_keys(node, prefix: str = ""):
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        yield dotted
        if isinstance(value, dict):
            yield from _dotted_keys(value, dotted)


def shows_config(argv: list[str]) -> bool:
    return any(_flag(a) in _SHOW_FLAGS for a in argv)


def redact(text: str, argv: list[str]) -> str:
    """Hydra's --cfg/--help/--info output with every secret value replaced."""
    package = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--package", "-p")), None)
    package = package or next((a.split("=", 1)[1] for a in argv if a.startswith("--package=")), None)
    if package and package.split(".")[-1] in SECRET_KEYS and text.strip() not in _EMPTY + ("None",):
        return "<redacted>\n"  # --cfg job --package server.auth_token prints the bare value
    out, inside = [], None  # inside: indent of a redacted key, whose deeper lines continue its value
    for line in text.splitlines(keepends=True):
        indent = len(line) - len(line.lstrip(" "))
        if inside is not None and (not line.strip() or indent > inside):
            continue
        inside = None
        match = _SECRET_LINE.match(line.rstrip("\n"))
        if match and match.group("value").strip() not in _EMPTY[:-1]:
            out.append(f"{line[:match.start('key')]}{match.group('key')}: {REDACTED}\n")
            inside = indent
            continue
        override = _SECRET_OVERRIDE.search(line)
        if override:  # the override as Hydra echoes it
            head, value = line[:override.end()], line[override.end():].rstrip("\n")
            if value[:1] not in ("'", '"') and "," in value:  # override_dirname: a=b,c=d; keep the others
                out.append(f"{head}<redacted>{value[value.index(','):]}\n")
                continue
            quote = "".join(q for q in "'\"" if head.count(q) % 2)  # close a YAML quote the cut opened
            out.append(f"{head}<redacted>{quote}\n")  # a quoted value may hold commas: cut the line
            inside = indent
            continue
        out.append(line)
    return "".join(out)


def run_showing_config(hydra_main: Callable[[], None], argv: list[str]) -> int:
    """Run Hydra's printing mode with stdout captured, then print it redacted; the exit code."""
    captured, code = io.StringIO(), 0
    with contextlib.redirect_stdout(captured):
        try:
            hydra_main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.write(redact(captured.getvalue(), argv))
    sys.stdout.flush()
    return code
