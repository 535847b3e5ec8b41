"""The Hydra entry point (`python -m server`, console script `epserve`).

Hydra lives here and nowhere else: the composed tree becomes a frozen AppConfig, and a bad
setting ends start-up with one paragraph naming the key, exit code 2, no traceback.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

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
    _hydra_main()
