"""bench.mode=static: the kernel-level measurement (measure.py) on every EP rank.

Static mode bypasses the scheduler and engine: each rank builds its ForwardBatches itself and
feeds precomputed device tensors, so it isolates the model's kernels (and compares them with
transformers on the same weights) — a regression check, not the served speed.

Ranks: this process is rank 0; at ep_size > 1 ranks 1.. are spawned by the engine's launcher
(server/engine/launcher.spawn_ranks, the one place ranks are started) and joined through the
engine's rank plumbing (the model's EP group plus a gloo control group). A rank that exits
early fails the run at once; one that runs longer than bench.rank_timeout_s dumps its stack
and exits, so a hung collective fails the run instead of eating the machine's time.
"""
from __future__ import annotations

import faulthandler
import gc
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..worker.distributed import init_rank_groups, resolve_backend, resolve_device
from ..core.startup import kill_ranks, spawn_ranks, watching_ranks
from .measure import RankEnv, device_info, measure_rank, progress_total, summarize
from .settings import BenchSettings

#: never NVLink multicast (on shared hosts it can take the GPUs out of service); spawned ranks inherit it
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _progress(settings: BenchSettings, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=progress_total(settings), desc=settings.tag(), disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def run_static(settings: BenchSettings) -> dict:
    """-> the run's JSON document (see measure.summarize)."""
    os.environ.update(NO_MULTICAST)
    world = settings.ep_size
    device = resolve_device(settings.parallel, 0)
    if world == 1:
        faulthandler.dump_traceback_later(settings.bench.rank_timeout_s, exit=True)
        try:
            with _progress(settings, True) as bar:
                result = measure_rank(settings, RankEnv(0, 1, device), progress=bar)
        finally:
            faulthandler.cancel_dump_traceback_later()
        gc.collect()
        return summarize(settings, [result], device_info(device, 1))
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ConfigError(f"parallel.ep_size={world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")
    procs, init_method = spawn_ranks(settings.parallel, world, _rank_main,
                                     (settings.to_dict(), settings.command, os.getpid()))
    threads = torch.get_num_threads()
    if device.type == "cpu":  # the ranks share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        ranks = watching_ranks(procs, lambda: _measure(0, world, init_method, settings), during="the static benchmark")
    finally:
        torch.set_num_threads(threads)
        for proc in procs:
            proc.join(timeout=30)
        kill_ranks(procs)
    return summarize(settings, ranks, device_info(device, world))


def _measure(rank: int, world: int, init_method: str, settings: BenchSettings) -> list | None:
    """This rank's measurement; rank 0 gets every rank's result (None elsewhere)."""
    faulthandler.dump_traceback_later(settings.bench.rank_timeout_s, exit=True)
    device = resolve_device(settings.parallel, rank)
    groups = init_rank_groups(rank, world, resolve_backend(settings.parallel, device), device, init_method)
    try:
        env = RankEnv(rank, world, device, ep_group=groups.ep_group,
                      barrier=lambda: dist.barrier(group=groups.ctrl_group))
        with _progress(settings, rank == 0) as bar:
            mine = measure_rank(settings, env, progress=bar)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine, group=groups.ctrl_group)
        return gathered if rank == 0 else None
    finally:
        faulthandler.cancel_dump_traceback_later()
        dist.destroy_process_group()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _rank_main(rank: int, world: int, init_method: str, settings_dict: dict, command: str, parent_pid: int) -> None:
    """Entry of a spawned rank >= 1."""
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    settings = BenchSettings.from_dict(settings_dict, command)
    if resolve_device(settings.parallel, rank).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    _measure(rank, world, init_method, settings)
