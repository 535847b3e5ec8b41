"""Hydra entry point of the benchmark (`epserve-bench`, `python -m server.bench`).

Hydra stays here: the composed config becomes a frozen BenchSettings, each job (one per
multirun combination) runs `run_benchmark`, writes its JSON and refreshes the summary, then
prints the summary table last. A bad setting ends the job with one line naming the key.
"""
from __future__ import annotations

import logging
import shlex
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError


def _command(cfg: DictConfig) -> str:
    """The command line that reproduces this job (multirun: this job's own overrides)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:
        overrides = sys.argv[1:]
    return "python -m server.bench " + " ".join(shlex.quote(o) for o in overrides)


@hydra.main(version_base="1.3", config_path="../../conf/bench", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from pathlib import Path

    from .static_run import run_static
    from .report import print_table, write_run
    from .settings import BenchSettings

    try:
        settings = BenchSettings.from_dict(OmegaConf.to_container(cfg, resolve=True), command=_command(cfg))
    except ConfigError as exc:
        print(f"epserve-bench: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    out_dir = Path(settings.bench.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger(__name__).info("run %s -> %s", settings.tag(), out_dir)
    doc = run_static(settings)
    path = write_run(doc, out_dir)
    from .report import load_runs

    print(f"\nwrote {path} and {out_dir / 'summary.md'}", flush=True)
    print_table(load_runs(out_dir))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _hydra_main()
