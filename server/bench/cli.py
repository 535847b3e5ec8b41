"""Hydra entry point of the benchmark (`epserve-bench`, `python -m server.bench`).

Hydra stays here: the composed config becomes a frozen BenchSettings and each job (one per
multirun combination) runs in its mode —

  bench.mode=engine (default)  experiment.py: every policy of bench.policies through the real
                               engine, switched in place and interleaved; writes
                               <out>/balance/<tag>.{json,md,png} and prints the table
  bench.mode=whatif            whatif/: every policy at parallel.ep_size emulated on one device
                               (ranks' work measured one after the other, the wire modelled);
                               writes <out>/whatif/<tag>.{json,md,png} and prints the table
  bench.mode=static            static_run.py: the kernel-level loop for the composed routing
                               policy beside transformers; writes <out>/runs/<tag>.json,
                               refreshes <out>/summary.md and prints the summary table

A bad setting ends the job with one line naming the key, exit code 2.
"""
from __future__ import annotations

import gc
import json
import logging
import shlex
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError

_SERVER_KEYS = ("model.", "parallel.")  # overrides the served run repeats for `python -m server`


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:
        return sys.argv[1:]


def _command() -> str:
    """The command line that reproduces this job (multirun: this job's own overrides)."""
    return "python -m server.bench " + " ".join(shlex.quote(o) for o in _overrides())


def _server_overrides() -> tuple[str, ...]:
    """The model and parallel group choices, and every model.* / parallel.* override."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices
    keep = [o for o in _overrides() if o.lstrip("+~").split("=", 1)[0].startswith(_SERVER_KEYS)]
    return (f"model={choices['model']}", f"parallel={choices['parallel']}", *keep)


@hydra.main(version_base="1.3", config_path="../../conf/bench", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from .settings import BenchSettings

    try:
        settings = BenchSettings.from_dict(OmegaConf.to_container(cfg, resolve=True), command=_command(),
                                           server_overrides=_server_overrides())
        out_dir = Path(settings.bench.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        logging.getLogger(__name__).info("run %s (%s mode) -> %s", settings.tag(), settings.bench.mode, out_dir)
        {"static": _static, "whatif": _whatif}.get(settings.bench.mode, _engine)(settings, out_dir)
        _release_device()
    except ConfigError as exc:
        print(f"epserve-bench: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


def _engine(settings, out_dir: Path) -> None:
    from .balance_report import markdown, write_balance_run
    from .experiment import run_experiment

    paths = write_balance_run(run_experiment(settings), out_dir)
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}\n", flush=True)
    print(markdown(json.loads(paths["json"].read_text())), end="", flush=True)


def _whatif(settings, out_dir: Path) -> None:
    from .whatif.document import run_whatif
    from .whatif.report import markdown, write_whatif_run

    doc = run_whatif(settings)
    paths = write_whatif_run(doc, out_dir, settings.tag())
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}\n", flush=True)
    print(markdown(doc), end="", flush=True)


def _static(settings, out_dir: Path) -> None:
    from .report import load_runs, print_table, write_run
    from .static_run import run_static

    path = write_run(run_static(settings), out_dir)
    print(f"\nwrote {path} and {out_dir / 'summary.md'}", flush=True)
    print_table(load_runs(out_dir))


def _release_device() -> None:
    """Free the run's engine (CUDA graphs, KV cache, streams) now, while CUDA and torch are
    whole: left to interpreter shutdown, the garbage collector can destroy captured graphs after
    the allocator state they point into, which aborts the process after its results are written."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def main() -> None:
    argv = sys.argv[1:]
    if "--version" in argv:
        from ..command_help import epserve_version

        print(f"epserve-bench {epserve_version()}")
        sys.exit(0)
    if "--help" in argv or "-h" in argv:  # Hydra's own lists no groups: they come through the search path
        from ..command_help import help_text
        from ..command_line import CONF_DIR

        overrides = [a for a in argv if not a.startswith("-")]
        sys.stdout.write(help_text("epserve-bench", CONF_DIR / "bench", "config", overrides))
        sys.exit(0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _hydra_main()
