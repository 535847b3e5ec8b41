"""The Hydra entry point (`python -m server`, console script `epserve`).

Hydra lives here and nowhere else: the composed tree becomes a frozen AppConfig, and a bad
setting ends start-up with one paragraph naming the key, exit code 2, no traceback (an unknown
group option too, and --cfg/--help/--info print the config with the token redacted: see
command_line.py).
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from .command_line import run_showing_config, shows_config, unknown_group_option
from .config import AppConfig, ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        app = AppConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
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
    problem = unknown_group_option(argv)
    if problem:
        print(f"epserve: configuration error: {problem}", file=sys.stderr)
        sys.exit(2)
    if shows_config(argv):
        sys.exit(run_showing_config(_hydra_main, argv))
    _hydra_main()
