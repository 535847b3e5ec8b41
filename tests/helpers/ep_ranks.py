"""Run a function on `ep_size` ranks (torch.multiprocessing spawn; gloo on CPU or NCCL, free port).

The rank function gets (rank, ep_size, *args), runs with the default process group set up,
and returns a picklable result; `run_on_ranks` returns the list of results by rank. This
module imports no transformers, so spawned ranks start fast.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, ep_size: int, port: int, out_dir: str, args: tuple, backend: str) -> None:
    torch.set_num_threads(1)  # ranks share two cores
    os.environ.setdefault("TQDM_DISABLE", "1")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ep_size)
    try:
        result = fn(rank, ep_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_on_ranks(fn: Callable, ep_size: int, *args: Any, backend: str = "gloo") -> list[Any]:
    """Results of fn(rank, ep_size, *args) by rank; `backend` nccl puts rank r on cuda:r."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(fn, ep_size, free_port(), out_dir, args, backend), nprocs=ep_size, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(ep_size)]
