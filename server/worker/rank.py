"""An EP rank: load this rank's part of the model, then execute rank 0's step plans.

Rank 0 runs the same `build_runner` and start-up handshake in its own process (launcher);
ranks 1.. run `run_worker` — in a process epserve spawned, or under torchrun. Every rank loads
what rank 0's launch plan says (server/launch_plan.py; received once the group is up). A
worker keeps no per-request state beyond its slot table, which each plan updates (step_plan.py).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ParallelConfig
from ..launch_plan import LaunchPlan
from .distributed import RankGroups, destroy, init_rank_groups, resolve_backend, resolve_device
from .group_signals import ignore_group_signals
from .kv_sizing import KvCacheSize, kv_cache_size
from .model_runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class ReadyReport:
    rank: int
    device: str
    error: str | None = None
    kv: KvCacheSize | None = None  # the KV cache this rank can hold (first round), or the one agreed


def load_rank_model(plan: LaunchPlan, rank: int, device: torch.device, groups: RankGroups | None):
    """Load this rank's shard (its experts only), as the plan says."""
    from ..kernels.backend import KernelBackend
    from ..model.loader import load_model

    app = plan.app
    ep_group = groups.ep_group if groups is not None else None
    if app.server.allow_routing_switch:  # plugins a live switch may name are the ones found now
        from ..moe.routing import available_policies

        available_policies()
    return load_model(app.model, policy=plan.policy, ep_rank=rank, ep_size=plan.ep_size, ep_group=ep_group,
                      device=device, dtype=None, eplb=plan.eplb, dispatch=plan.dispatch, spec=plan.spec,
                      kernels=KernelBackend.for_device(device, plan.kernels))


def make_runner(model, plan: LaunchPlan, rank: int, device: torch.device, groups: RankGroups | None,
                kv: KvCacheSize) -> ModelRunner:
    """Allocate the KV cache the ranks agreed on (`kv`) and the step buffers around `model`."""
    eng, app = plan.app.engine, plan.app
    runner = ModelRunner(model, rank=rank, num_blocks=kv.num_blocks,
                         block_size=eng.kv_block_size, device=device,
                         ep_group=groups.ep_group if groups is not None else None,
                         max_num_seqs=eng.max_num_seqs, max_model_len=app.model.max_model_len,
                         max_num_batched_tokens=eng.max_num_batched_tokens, cuda_graphs=plan.kernels.cuda_graphs)
    runner.kv_size = kv
    return runner


def build_runner(plan: LaunchPlan, rank: int, device: torch.device, groups: RankGroups | None) -> ModelRunner:
    """One rank on its own: load its shard and size its KV cache (kv_sizing.py) by itself."""
    model = load_rank_model(plan, rank, device, groups)
    return make_runner(model, plan, rank, device, groups, kv_cache_size(model, plan.app.engine, device))


def share_plan(plan: LaunchPlan | None, groups: RankGroups) -> LaunchPlan:
    """Rank 0's launch plan, on every rank (rank 0 passes it, the others None)."""
    box = [plan]
    dist.broadcast_object_list(box, src=0, group=groups.ctrl_group)
    return box[0]


def start_rank(plan: LaunchPlan | None, parallel: ParallelConfig, rank: int, world_size: int, local_rank: int,
               init_method: str | None) -> tuple[ModelRunner | None, RankGroups, list[ReadyReport]]:
    """Join the process group, receive rank 0's launch plan, load the model, and learn whether
    every rank did too.

    Every rank reports (all_gather_object), so a load failure on any rank stops all of them
    cleanly instead of leaving the others waiting for a first plan.
    """
    device = resolve_device(parallel, local_rank)
    backend = resolve_backend(parallel, device)
    groups = init_rank_groups(rank, world_size, backend, device, init_method)
    plan = share_plan(plan, groups)
    model, kv, error = None, None, None
    try:
        model = load_rank_model(plan, rank, device, groups)
        kv = kv_cache_size(model, plan.app.engine, device)
    except Exception:
        error = traceback.format_exc()
        log.error("EP rank %d failed to load the model:\n%s", rank, error)
    reports = _gather_reports(ReadyReport(rank, str(device), error, kv), world_size, groups)
    if any(r.error for r in reports):
        return None, groups, reports
    # one scheduler plans every rank with one block count: the smallest any rank can hold
    agreed = min((r.kv for r in reports), key=lambda k: k.num_blocks)
    runner = None
    try:
        runner = make_runner(model, plan, rank, device, groups, agreed)
    except Exception:
        error = traceback.format_exc()
        log.error("EP rank %d failed to allocate its KV cache and step buffers:\n%s", rank, error)
    reports = _gather_reports(ReadyReport(rank, str(device), error, agreed), world_size, groups)
    return runner, groups, reports


def _gather_reports(mine: ReadyReport, world_size: int, groups: RankGroups) -> list[ReadyReport]:
    """Every rank's report, on every rank: a failure anywhere stops all of them cleanly."""
    reports: list[ReadyReport | None] = [None] * world_size
    dist.all_gather_object(reports, mine, group=groups.ctrl_group)
    return reports  # type: ignore[return-value]


def serve_plans(runner: ModelRunner, groups: RankGroups) -> None:
    """Worker loop: receive a plan, run it, send the result; until a stop plan."""
    while True:
        box = [None]
        dist.scatter_object_list(box, None, src=0, group=groups.ctrl_group)
        plan = box[0]
        if plan.stop:
            return
        result = runner.run(plan)
        dist.gather_object(result, None, dst=0, group=groups.ctrl_group)


def run_worker(parallel: ParallelConfig, rank: int, world_size: int, local_rank: int, init_method: str | None) -> int:
    """A rank >= 1 from start to exit; returns the process exit code."""
    if resolve_device(parallel, local_rank).type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    runner, groups, reports = start_rank(None, parallel, rank, world_size, local_rank, init_method)
    if runner is None or any(r.error for r in reports):
        destroy()
        return 1
    try:
        serve_plans(runner, groups)
    except Exception:
        # A failed step leaves peers inside collectives: exit hard so our sockets close and
        # they (and rank 0's watchdog) notice now rather than at a timeout.
        log.error("EP rank %d failed:\n%s", rank, traceback.format_exc())
        logging.shutdown()
        os._exit(1)
    destroy()
    return 0


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(1.0)


def spawned_worker_main(rank: int, world_size: int, init_method: str, parallel: ParallelConfig, parent_pid: int,
                        log_level: str) -> None:
    """Entry point of a worker process spawned by epserve (multiprocessing, spawn). It ignores
    SIGINT/SIGTERM: rank 0 tells it when to stop (group_signals.py)."""
    ignore_group_signals()
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    code = run_worker(parallel, rank, world_size, local_rank=rank, init_method=init_method)
    if code:
        os._exit(code)
