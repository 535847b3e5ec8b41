"""Build the engine core from an AppConfig: check, spawn or join the EP ranks, load rank 0.

  * ep_size 1: everything in this process, no process group (a size-1 one when
    parallel.dispatch forces the EP path: allgather / alltoall).
  * ep_size N: epserve spawns ranks 1..N-1 (torch.multiprocessing, spawn) on a free port;
    this process is rank 0 and serves.
  * under torchrun (RANK / WORLD_SIZE set): every process runs `python -m server`; rank 0
    builds the core (frontend/start.py), the others `run_worker_rank` (server.launch dispatches
    on `torchrun_rank()`).

Everything that can be checked without loading weights — model shape, routing policy,
ep_size, devices — is checked before any process is spawned (the launch plan,
server/launch_plan.py, which every rank then receives), and raises ConfigError.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

from ..config import AppConfig, ConfigError
from ..dispatch_setup import needs_group_at_ep1
from ..launch_plan import LaunchPlan, build_launch_plan
from ..worker.distributed import free_port, resolve_device, torchrun_env
from ..engine.api import EngineStartError
from .engine_core import EngineCore
from .executor import DistributedExecutor, LocalExecutor
from ..worker.group_signals import ignore_group_signals, spawning_signal_proof
from ..worker.rank import build_runner, run_worker, spawned_worker_main, start_rank

log = logging.getLogger(__name__)


def torchrun_rank() -> int | None:
    """This process's rank when launched by torchrun, else None."""
    env = torchrun_env()
    return env.rank if env is not None else None


def world_size(app: AppConfig) -> int:
    """parallel.ep_size, or torchrun's WORLD_SIZE (ConfigError if they disagree)."""
    env = torchrun_env()
    if env is None:
        return app.parallel.ep_size
    if app.parallel.ep_size not in (1, env.world_size):
        raise ConfigError(f"parallel.ep_size={app.parallel.ep_size} but torchrun started {env.world_size} processes (WORLD_SIZE)")
    return env.world_size


def build_engine_core(app: AppConfig) -> EngineCore:
    """Build the launch plan, spawn or join the EP ranks, load rank 0's shard: the EngineCore of
    this process (no tokenizer, no core loop). Raises ConfigError (bad setting, before anything
    is spawned) or EngineStartError (a rank failed to come up)."""
    env = torchrun_env()
    if env is not None and env.rank != 0:
        raise ConfigError(f"the engine core runs on rank 0; this is rank {env.rank} (call run_worker_rank)")
    plan = build_launch_plan(app, world_size(app))
    world = plan.ep_size
    local_rank = env.local_rank if env is not None else 0
    device = resolve_device(app.parallel, local_rank)
    if device.type == "cuda" and env is None:
        import torch

        if world > torch.cuda.device_count():
            raise ConfigError(f"parallel.ep_size={world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")
    if world == 1:
        groups, created = None, False
        if needs_group_at_ep1(plan.dispatch):  # the forced EP path
            from ..worker.distributed import resolve_backend, single_rank_group

            groups, created = single_rank_group(resolve_backend(app.parallel, device), device, app.parallel.master_addr)
        executor = LocalExecutor(build_runner(plan, 0, device, groups), groups if created else None)
    else:
        executor = _start_distributed(plan, local_rank, spawn=env is None)
    core = EngineCore(plan, executor=executor, device=str(device))
    log.info("%s", executor.runner.kv_size.describe(plan.max_model_len, app.engine.max_num_seqs, world))
    if app.engine.warmup:
        try:
            watching_ranks(getattr(executor, "procs", []), core.warm_up, during="the start-up warm-up")
        except BaseException:
            core.shutdown(graceful=False)
            raise
    return core


def spawn_ranks(parallel, world: int, entry: Callable[..., None], args: tuple) -> tuple[list, str]:
    """Start EP ranks 1..world-1, each a spawned process running
    `entry(rank, world, init_method, *args)`; this process is rank 0 and joins the same
    `init_method`. -> (processes by rank 1.., init_method). The one place ranks are spawned:
    the engine's workers and the benchmark's static mode both come through here."""
    import torch.multiprocessing as mp

    addr = parallel.master_addr
    port = parallel.master_port or free_port(addr)
    init_method = f"tcp://[{addr}]:{port}" if ":" in addr else f"tcp://{addr}:{port}"
    ctx = mp.get_context("spawn")
    procs = []
    try:
        for rank in range(1, world):
            proc = ctx.Process(target=entry, name=f"epserve-rank{rank}", daemon=True,
                               args=(rank, world, init_method, *args))
            proc.start()
            procs.append(proc)
    except BaseException:
        kill_ranks(procs)
        raise
    return procs, init_method


def _start_distributed(plan: LaunchPlan, local_rank: int, spawn: bool) -> DistributedExecutor:
    parallel, world = plan.app.parallel, plan.ep_size
    procs: list = []
    init_method = None
    if spawn:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        with spawning_signal_proof():  # ranks follow rank 0's drain, never Ctrl-C (group_signals.py)
            procs, init_method = spawn_ranks(parallel, world, spawned_worker_main, (parallel, os.getpid(), level))
    try:
        runner, groups, reports = watching_ranks(procs, lambda: start_rank(plan, parallel, 0, world, local_rank, init_method))
    except BaseException:
        kill_ranks(procs)
        raise
    errors = [r for r in reports if r.error]
    if errors:
        kill_ranks(procs)
        from ..worker.distributed import destroy

        destroy()
        raise EngineStartError("; ".join(f"EP rank {r.rank} failed to start: {r.error.strip().splitlines()[-1]}" for r in errors))
    log.info("EP ranks up: %s", ", ".join(f"{r.rank}@{r.device}" for r in reports))
    return DistributedExecutor(runner, groups, procs)


def watching_ranks(procs: list, fn: Callable[[], Any], poll_s: float = 0.2, during: str = "start-up") -> Any:
    """Run fn() (start-up collectives, or another stretch all ranks work through together)
    while watching spawned ranks: if one dies first, raise EngineStartError instead of waiting
    for a collective that cannot complete."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="epserve-rank0-start", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(poll_s)
        for rank, proc in enumerate(procs, start=1):
            if proc.exitcode is not None and thread.is_alive():
                raise EngineStartError(f"EP rank {rank} exited during {during} (exit code {proc.exitcode}); see its log")
    if "error" in box:
        raise box["error"]
    return box["value"]


def kill_ranks(procs: list) -> None:
    """Kill spawned ranks that are still running (SIGKILL: the engine's ranks ignore SIGTERM,
    and a stopped one acts on nothing else)."""
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=5)


def run_worker_rank(app: AppConfig) -> int:
    """Entry for torchrun ranks != 0: serve rank 0's plans until told to stop. Exit code. The
    launch plan comes from rank 0 once the process group is up."""
    env = torchrun_env()
    if env is None or env.rank == 0:
        raise ConfigError("run_worker_rank is for torchrun ranks other than 0")
    ignore_group_signals()  # Ctrl-C on torchrun's group: rank 0 drains and stops us
    return run_worker(app.parallel, env.rank, world_size(app), env.local_rank, init_method=None)
