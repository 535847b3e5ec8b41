"""Process-group plumbing for EP ranks: who am I, which device, which backend, which groups.

Two groups: the model's EP group (NCCL on GPUs, gloo on CPU) carries the MoE all-to-alls
and the expert-load reduction; a gloo control group carries the scheduler's step plans and
the sampled tokens as pickled Python objects, on the CPU, whatever the EP backend.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from ..config import ConfigError, ParallelConfig
from .rendezvous import free_port, pin_interfaces_to_loopback, tcp_store  # noqa: F401  (free_port: re-exported)

# Collectives may legitimately wait this long (a huge first prefill, warm-up). Idle engines
# send a heartbeat plan every few seconds, so a waiting worker never hits it while healthy.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> TorchrunEnv | None:
    """RANK/WORLD_SIZE/LOCAL_RANK when launched by torchrun (or any env:// launcher)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return TorchrunEnv(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def resolve_device(parallel: ParallelConfig, local_rank: int) -> torch.device:
    want = parallel.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("parallel.device=cuda but no CUDA device is available")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(f"EP rank with local rank {local_rank} needs a GPU, but this node has {count} (parallel.ep_size)")
    return torch.device("cuda", local_rank)


def resolve_backend(parallel: ParallelConfig, device: torch.device) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass
class RankGroups:
    rank: int
    world_size: int
    ep_group: dist.ProcessGroup  # the model's collectives
    ctrl_group: dist.ProcessGroup  # gloo: plans and results
    backend: str = "gloo"  # of ep_group


def init_rank_groups(rank: int, world_size: int, backend: str, device: torch.device, init_method: str | None) -> RankGroups:
    """init_process_group + a gloo control group. `init_method` None means env:// (torchrun).
    Every socket this opens listens on the master address's side only (rendezvous.py)."""
    kwargs = dict(backend=backend, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    if init_method is not None:
        pin_interfaces_to_loopback(urlsplit(init_method).hostname or "")
        kwargs["store"] = tcp_store(init_method, rank, world_size, COLLECTIVE_TIMEOUT)
    else:
        pin_interfaces_to_loopback(os.environ.get("MASTER_ADDR", ""))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    ep_group = dist.group.WORLD
    ctrl_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return RankGroups(rank, world_size, ep_group, ctrl_group, backend)


def single_rank_group(backend: str, device: torch.device, host: str = "127.0.0.1") -> tuple[RankGroups, bool]:
    """A size-1 process group for the forced EP path at ep_size 1 (parallel.dispatch=allgather):
    the EP collectives then run for real, on one device. -> (groups, created): this process's
    default group is reused if it already is a size-1 one (then the caller must not destroy it)."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConfigError(f"a forced EP dispatch at ep_size 1 needs a size-1 process group; this process is "
                              f"already in one of size {dist.get_world_size()}")
        return RankGroups(0, 1, dist.group.WORLD, dist.group.WORLD, dist.get_backend()), False
    return init_rank_groups(0, 1, backend, device, f"tcp://{host}:{free_port(host)}"), True


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def abandon(groups: RankGroups, timeout_s: float = 5.0) -> None:
    """Tear the process groups down after a failure, when peers may be gone and another
    thread may still sit in a collective: abort NCCL communicators first (that unblocks
    it), and never wait on the teardown for more than `timeout_s`."""
    def teardown() -> None:
        if groups.backend == "nccl":
            try:
                from torch.distributed.distributed_c10d import _abort_process_group

                _abort_process_group()
            except Exception:  # experimental API; the process exits soon anyway
                pass
        try:
            destroy()
        except Exception:
            pass

    worker = threading.Thread(target=teardown, name="epserve-pg-teardown", daemon=True)
    worker.start()
    worker.join(timeout_s)
