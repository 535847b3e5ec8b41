"""Build the engine core from an AppConfig: check, spawn or join the EP ranks, load rank 0.

  * ep_size 1: everything in this process, no process group (a size-1 one when
    parallel.dispatch forces the EP path: allgather / alltoall).
  * ep_size N: epserve spawns ranks 1..N-1 (torch.multiprocessing, spawn) on a free port;
    this process is rank 0 and serves.
  * under torchrun (RANK / WORLD_SIZE set): every process runs `python -m server`; rank 0
    builds the core (engine_start.py), the others `run_worker_rank` (server.launch dispatches
    on `torchrun_rank()`).

Everything that can be checked without loading weights — model shape, routing policy,
ep_size, devices — is checked before any process is spawned, and raises ConfigError.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import fields, is_dataclass
from typing import Any, Callable

from ..config import AppConfig, ConfigError, RoutingConfig, thaw
from ..dispatch_setup import build_dispatch_settings, needs_group_at_ep1
from ..eplb_setup import build_eplb_settings
from ..routing_setup import build_routing_policy
from .distributed import free_port, resolve_device, torchrun_env
from .api import EngineStartError
from .core import EngineCore
from .executor import DistributedExecutor, LocalExecutor
from .group_signals import ignore_group_signals, spawning_signal_proof
from .rank_worker import build_runner, run_worker, spawned_worker_main, start_rank

log = logging.getLogger(__name__)


def app_to_dict(app: AppConfig) -> dict[str, Any]:
    """AppConfig -> the plain dict AppConfig.from_dict accepts (picklable: for spawned ranks)."""
    out: dict[str, Any] = {}
    for f in fields(app):
        value = getattr(app, f.name)
        if isinstance(value, RoutingConfig):
            out[f.name] = {"name": value.name, **thaw(value.params)}
        elif is_dataclass(value):
            out[f.name] = {g.name: thaw(getattr(value, g.name)) for g in fields(value)}
        else:
            out[f.name] = thaw(value)
    return out


def torchrun_rank() -> int | None:
    """This process's rank when launched by torchrun, else None."""
    env = torchrun_env()
    return env.rank if env is not None else None


def _world_size(app: AppConfig) -> int:
    env = torchrun_env()
    if env is None:
        return app.parallel.ep_size
    if app.parallel.ep_size not in (1, env.world_size):
        raise ConfigError(f"parallel.ep_size={app.parallel.ep_size} but torchrun started {env.world_size} processes (WORLD_SIZE)")
    return env.world_size


def _model_setup(app: AppConfig, world_size: int):
    """(spec, routing policy, effective max_model_len), or ConfigError. Loads no weights."""
    from ..model.loader import read_model_spec
    from ..model.spec import ModelLoadError

    try:
        spec = read_model_spec(app.model)
    except (ModelLoadError, FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from exc
    policy = build_routing_policy(app.routing, num_experts=spec.num_experts, top_k=spec.top_k, ep_size=world_size,
                                  num_layers=spec.num_moe_layers)
    build_eplb_settings(app.parallel, spec, world_size)  # EPLB keys vs the model: ConfigError now, not on a rank
    build_dispatch_settings(app.parallel, app.engine, world_size)  # parallel.dispatch: likewise
    max_model_len = app.model.max_model_len
    if spec.max_position_embeddings and max_model_len > spec.max_position_embeddings:
        log.warning("model.max_model_len=%d exceeds the model's max_position_embeddings=%d; using %d",
                    max_model_len, spec.max_position_embeddings, spec.max_position_embeddings)
        max_model_len = spec.max_position_embeddings
    cache_tokens = app.engine.kv_cache_tokens
    if max_model_len > cache_tokens:
        log.warning("max_model_len=%d exceeds one rank's KV cache (engine.kv_cache_tokens=%d): requests needing "
                    "more than the cache will be refused", max_model_len, cache_tokens)
    return spec, policy, max_model_len


def build_engine_core(app: AppConfig) -> EngineCore:
    """Check the config, spawn or join the EP ranks, load rank 0's shard: the EngineCore of this
    process (no tokenizer, no core loop). Raises ConfigError (bad setting, before anything is
    spawned) or EngineStartError (a rank failed to come up)."""
    env = torchrun_env()
    if env is not None and env.rank != 0:
        raise ConfigError(f"the engine core runs on rank 0; this is rank {env.rank} (call run_worker_rank)")
    world = _world_size(app)
    spec, policy, max_model_len = _model_setup(app, world)
    local_rank = env.local_rank if env is not None else 0
    device = resolve_device(app.parallel, local_rank)
    if device.type == "cuda" and env is None:
        import torch

        if world > torch.cuda.device_count():
            raise ConfigError(f"parallel.ep_size={world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")
    if world == 1:
        groups, created = None, False
        if needs_group_at_ep1(build_dispatch_settings(app.parallel, app.engine, 1)):  # the forced EP path
            from .distributed import resolve_backend, single_rank_group

            groups, created = single_rank_group(resolve_backend(app.parallel, device), device, app.parallel.master_addr)
        executor = LocalExecutor(build_runner(app, policy, 0, 1, device, groups), groups if created else None)
    else:
        executor = _start_distributed(app, policy, world, local_rank, spawn=env is None)
    core = EngineCore(app=app, spec=spec, policy=policy, executor=executor, device=str(device),
                      max_model_len=max_model_len)
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


def _start_distributed(app: AppConfig, policy, world: int, local_rank: int, spawn: bool) -> DistributedExecutor:
    procs: list = []
    init_method = None
    if spawn:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        with spawning_signal_proof():  # ranks follow rank 0's drain, never Ctrl-C (group_signals.py)
            procs, init_method = spawn_ranks(app.parallel, world, spawned_worker_main,
                                             (app_to_dict(app), policy, os.getpid(), level))
    try:
        runner, groups, reports = watching_ranks(procs, lambda: start_rank(app, policy, 0, world, local_rank, init_method))
    except BaseException:
        kill_ranks(procs)
        raise
    errors = [r for r in reports if r.error]
    if errors:
        kill_ranks(procs)
        from .distributed import destroy

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
    """Entry for torchrun ranks != 0: serve rank 0's plans until told to stop. Exit code."""
    env = torchrun_env()
    if env is None or env.rank == 0:
        raise ConfigError("run_worker_rank is for torchrun ranks other than 0")
    ignore_group_signals()  # Ctrl-C on torchrun's group: rank 0 drains and stops us
    world = _world_size(app)
    _, policy, _ = _model_setup(app, world)
    return run_worker(app, policy, env.rank, world, env.local_rank, init_method=None)
