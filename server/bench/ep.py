"""Run one benchmark on every rank: in this process at ep_size 1, else one spawned process per
EP rank (NCCL on GPUs, gloo on CPU), joined through the engine's own rank plumbing
(server/engine/distributed.py: the model's EP group plus a gloo control group).

NVLink multicast stays off in every rank (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1): on shared hosts it can take the GPUs out of service. A rank that runs
longer than bench.rank_timeout_s dumps its stack and exits, so a hung collective fails the run
instead of eating the machine's time; torch.multiprocessing then stops the other ranks.
"""
from __future__ import annotations

import faulthandler
import gc
import os
import pickle
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..engine.distributed import free_port, init_rank_groups, resolve_backend, resolve_device
from .measure import RankEnv, device_info, measure_rank, progress_total, summarize
from .settings import BenchSettings

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _progress(settings: BenchSettings, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=progress_total(settings), desc=settings.tag(), disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def run_benchmark(settings: BenchSettings) -> dict:
    """-> the run's JSON document (see measure.summarize)."""
    os.environ.update(NO_MULTICAST)
    world = settings.ep_size
    if world == 1:
        device = resolve_device(settings.parallel, 0)
        faulthandler.dump_traceback_later(settings.bench.rank_timeout_s, exit=True)
        try:
            with _progress(settings, True) as bar:
                result = measure_rank(settings, RankEnv(0, 1, device), progress=bar)
        finally:
            faulthandler.cancel_dump_traceback_later()
        gc.collect()
        return summarize(settings, [result], device_info(device, 1))
    device = resolve_device(settings.parallel, 0)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise ConfigError(f"parallel.ep_size={world} needs {world} GPUs; this machine has {torch.cuda.device_count()}")
    port = settings.parallel.master_port or free_port(settings.parallel.master_addr)
    init_method = f"tcp://{settings.parallel.master_addr}:{port}"
    with tempfile.TemporaryDirectory(prefix="epserve-bench-") as tmp:
        out = Path(tmp) / "rank0.pkl"
        import torch.multiprocessing as mp

        mp.spawn(_rank_main, args=(world, init_method, settings.to_dict(), settings.command, str(out)),
                 nprocs=world, join=True)
        with open(out, "rb") as f:
            ranks, dev = pickle.load(f)
    return summarize(settings, ranks, dev)


def _rank_main(rank: int, world: int, init_method: str, settings_dict: dict, command: str, out_path: str) -> None:
    os.environ.update(NO_MULTICAST)
    settings = BenchSettings.from_dict(settings_dict, command)
    faulthandler.dump_traceback_later(settings.bench.rank_timeout_s, exit=True)
    device = resolve_device(settings.parallel, rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    groups = init_rank_groups(rank, world, resolve_backend(settings.parallel, device), device, init_method)

    def barrier() -> None:
        dist.barrier(group=groups.ctrl_group)

    try:
        env = RankEnv(rank, world, device, ep_group=groups.ep_group, barrier=barrier)
        with _progress(settings, rank == 0) as bar:
            mine = measure_rank(settings, env, progress=bar)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine, group=groups.ctrl_group)
        if rank == 0:
            with open(out_path, "wb") as f:
                pickle.dump((gathered, device_info(device, world)), f)
    finally:
        faulthandler.cancel_dump_traceback_later()
        dist.destroy_process_group()
