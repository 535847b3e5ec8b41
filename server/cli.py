"""The Hydra entry point (`python -m server`, console script `epserve`).

Hydra lives here and nowhere else: the composed tree becomes a frozen AppConfig, and a bad
setting ends start-up with one paragraph naming the key, exit code 2, no traceback (an unknown
group option, a misspelled key or flag too, and --cfg/--info print the config with the token
redacted: see command_line.py). --help lists groups and keys with their meaning, --version
epserve's version (command_help.py).
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from .command_help import epserve_version, help_text
from .command_line import CONF_DIR, run_showing_config, shows_config, unknown_flag, unknown_group_option, unknown_key
from .config import AppConfig, ConfigError
from .startup_checks import check_before_listening


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        app = AppConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
        check_before_listening(app)  # before any port or process: exit 2 here, not after "listening"
    except ConfigError as exc:
        print(f"epserve: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    if app.dry_run:
        from .dry_run import dry_run

        sys.exit(dry_run(app))
    from .launch import launch

    sys.exit(launch(app))


def main() -> None:
    # Logging is configured in launch.py: Hydra's disabled job_logging removes root handlers.
    argv = sys.argv[1:]
    if "--version" in argv:
        print(f"epserve {epserve_version()}")
        sys.exit(0)
    problem = unknown_flag(argv) or unknown_group_option(argv) or unknown_key(argv)
    if problem:
        print(f"epserve: configuration error: {problem}", file=sys.stderr)
        sys.exit(2)
    if "--help" in argv or "-h" in argv:
        overrides = [a for a in argv if not a.startswith("-")]
        sys.stdout.write(help_text("epserve", CONF_DIR, "config", overrides))
        sys.exit(0)
    if shows_config(argv):
        sys.exit(run_showing_config(_hydra_main, argv))
    _hydra_main()
