"""Rank 0's way of running a step plan on every rank.

LocalExecutor: ep_size 1, the model runs in this process, no process group (or a size-1 one
for the forced EP dispatch path, destroyed at stop).
DistributedExecutor: scatter each rank its plan over the gloo control group, run rank 0's
share here, gather every rank's sampled tokens back. Spawned worker processes (if epserve
started them) are watched, so a dead rank is noticed even while a collective hangs.

`execute(plan)` runs a step to the end. `submit(plan)` starts it and returns a StepFuture at
once, so the caller can plan the next step and post-process the previous one meanwhile
(overlapped scheduling): on CUDA at ep_size 1 the launch is asynchronous by itself (kernels
queue, the sampled tokens come back by an asynchronous copy); where the step blocks the host
(CPU forwards, gloo collectives) it runs on one step thread, steps in order.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Protocol

import torch.distributed as dist

from ..worker.distributed import abandon
from ..worker.model_runner import ModelRunner, PendingStep
from ..worker.step_plan import RankPlan, RankResult, StepPlan

log = logging.getLogger(__name__)


class StepFuture(Protocol):
    def result(self) -> list[RankResult]: ...


class Executor(Protocol):
    num_ranks: int
    needs_heartbeat: bool

    def bind_thread(self) -> None: ...
    def execute(self, plan: StepPlan) -> list[RankResult]: ...
    def submit(self, plan: StepPlan) -> StepFuture: ...
    def dead_rank(self) -> str | None: ...
    def stop(self, graceful: bool) -> None: ...


class _Launched:
    """A step launched asynchronously on this thread (CUDA): waits for its copies on result()."""

    def __init__(self, pending: PendingStep) -> None:
        self._pending = pending

    def result(self) -> list[RankResult]:
        return [self._pending.result()]


class _StepThread:
    """One daemon thread that runs steps in submission order (each start to end). Daemon: a
    step stuck in a collective with a dead peer must not keep the process from exiting."""

    def __init__(self, initializer: Callable[[], None]) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._initializer = initializer
        self._thread = threading.Thread(target=self._loop, name="epserve-step", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], list[RankResult]]) -> Future:
        fut: Future = Future()
        self._queue.put((fn, fut))
        return fut

    def _loop(self) -> None:
        self._initializer()
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the step
                fut.set_exception(exc)

    def shutdown(self, wait: bool) -> None:
        """Let queued steps finish (wait=True joins them), then end the thread."""
        self._queue.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)


class LocalExecutor:
    num_ranks = 1
    needs_heartbeat = False

    def __init__(self, runner: ModelRunner, owned_groups=None) -> None:
        self.runner = runner
        self._thread: _StepThread | None = None
        if runner.device.type != "cuda":  # a CPU forward blocks: run it beside the engine loop
            self._thread = _StepThread(runner.bind_thread)
        self.owned_groups = owned_groups  # a size-1 process group made for the forced EP path: ours to destroy

    def bind_thread(self) -> None:
        self.runner.bind_thread()

    def execute(self, plan: StepPlan) -> list[RankResult]:
        return [self.runner.run(plan.ranks[0])]

    def submit(self, plan: StepPlan) -> StepFuture:
        if self._thread is not None:
            return self._thread.submit(lambda: self.execute(plan))
        return _Launched(self.runner.launch(plan.ranks[0]))

    def dead_rank(self) -> str | None:
        return None

    def stop(self, graceful: bool) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=graceful)
        if self.owned_groups is not None and dist.is_initialized():
            dist.destroy_process_group()
        self.owned_groups = None


class DistributedExecutor:
    needs_heartbeat = True  # idle engines still talk to workers: keeps them, and us, honest

    def __init__(self, runner: ModelRunner, groups, procs: list | None = None) -> None:
        self.runner = runner
        self.groups = groups
        self.num_ranks = groups.world_size
        self.procs = procs or []  # multiprocessing.Process for ranks 1.. (empty under torchrun)
        self._stopped = False
        self._thread = _StepThread(runner.bind_thread)  # collectives block: steps run beside the engine loop

    def bind_thread(self) -> None:
        self.runner.bind_thread()

    def execute(self, plan: StepPlan) -> list[RankResult]:
        box: list[RankPlan | None] = [None]
        dist.scatter_object_list(box, list(plan.ranks), src=0, group=self.groups.ctrl_group)
        mine = self.runner.run(box[0])
        results: list[RankResult | None] = [None] * self.num_ranks
        dist.gather_object(mine, results, dst=0, group=self.groups.ctrl_group)
        return results  # type: ignore[return-value]

    def submit(self, plan: StepPlan) -> StepFuture:
        return self._thread.submit(lambda: self.execute(plan))

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
        self._thread.shutdown(wait=graceful)  # a step still queued ends first: collectives stay in order
        if graceful:
            try:
                stop = [RankPlan.stop_plan()] * self.num_ranks
                dist.scatter_object_list([None], stop, src=0, group=self.groups.ctrl_group)
            except Exception as exc:  # a worker already gone: nothing to tell it
                log.warning("could not tell EP workers to stop: %s", exc)
        for proc in self.procs:  # ranks ignore SIGTERM (they follow rank 0): a rank still there is killed
            proc.join(timeout=10 if graceful else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if not graceful:
            abandon(self.groups)
        elif dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:
                log.warning("destroying the process group failed: %s", exc)
