"""Rank 0's way of running a step plan on every rank.

LocalExecutor: ep_size 1, the model runs in this process, no process group.
DistributedExecutor: scatter each rank its plan over the gloo control group, run rank 0's
share here, gather every rank's sampled tokens back. Spawned worker processes (if epserve
started them) are watched, so a dead rank is noticed even while a collective hangs.
"""
from __future__ import annotations

import logging
from typing import Protocol

import torch.distributed as dist

from .distributed import abandon
from .model_runner import ModelRunner
from .step_plan import RankPlan, RankResult, StepPlan

log = logging.getLogger(__name__)


class Executor(Protocol):
    num_ranks: int
    needs_heartbeat: bool

    def bind_thread(self) -> None: ...
    def execute(self, plan: StepPlan) -> list[RankResult]: ...
    def dead_rank(self) -> str | None: ...
    def stop(self, graceful: bool) -> None: ...


class LocalExecutor:
    num_ranks = 1
    needs_heartbeat = False

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def bind_thread(self) -> None:
        self.runner.bind_thread()

    def execute(self, plan: StepPlan) -> list[RankResult]:
        return [self.runner.run(plan.ranks[0])]

    def dead_rank(self) -> str | None:
        return None

    def stop(self, graceful: bool) -> None:
        pass


class DistributedExecutor:
    needs_heartbeat = True  # idle engines still talk to workers: keeps them, and us, honest

    def __init__(self, runner: ModelRunner, groups, procs: list | None = None) -> None:
        self.runner = runner
        self.groups = groups
        self.num_ranks = groups.world_size
        self.procs = procs or []  # multiprocessing.Process for ranks 1.. (empty under torchrun)
        self._stopped = False

    def bind_thread(self) -> None:
        self.runner.bind_thread()

    def execute(self, plan: StepPlan) -> list[RankResult]:
        box: list[RankPlan | None] = [None]
        dist.scatter_object_list(box, list(plan.ranks), src=0, group=self.groups.ctrl_group)
        mine = self.runner.run(box[0])
        results: list[RankResult | None] = [None] * self.num_ranks
        dist.gather_object(mine, results, dst=0, group=self.groups.ctrl_group)
        return results  # type: ignore[return-value]

    def dead_rank(self) -> str | None:
        for rank, proc in enumerate(self.procs, start=1):
            if proc.exitcode is not None and not self._stopped:
                return f"EP rank {rank} exited (exit code {proc.exitcode})"
        return None

    def stop(self, graceful: bool) -> None:
        """Tell workers to leave (if they can still listen), then make sure they are gone."""
        if self._stopped:
            return
        self._stopped = True
        if graceful:
            try:
                stop = [RankPlan(step=-1, work=[], token_offset=0, run_forward=False, stop=True)] * self.num_ranks
                dist.scatter_object_list([None], stop, src=0, group=self.groups.ctrl_group)
            except Exception as exc:  # a worker already gone: nothing to tell it
                log.warning("could not tell EP workers to stop: %s", exc)
        for proc in self.procs:
            proc.join(timeout=10 if graceful else 0.5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        if not graceful:
            abandon(self.groups)
        elif dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:
                log.warning("destroying the process group failed: %s", exc)
