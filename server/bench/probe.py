"""The probe pass: one untimed run of a request set under one policy, watched step by step.

Every step asks for the expert-load counters with reset (the step's own load, reduced over
the EP ranks) and rank 0's MoE blocks are timed with CUDA events (host clock on CPU; the
timer synchronises after every step, so the pass runs one step at a time). Decode runs
eagerly on rank 0 for the pass, since graph replays bypass the timing hooks. From it
come what EP users read per phase — per-rank (token, expert) pairs, active experts per
rank, balancedness per layer over ranks — and the balance bound (bound.py).
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

from ..core.step_io import StepOutputs
from ..moe.load_stats import ExpertLoadSnapshot, aggregate_layers, balancedness
from .bound import ProbeStep, balance_bound
from .drive import CoreDriver, RunTiming
from .moe_timer import MoETimer
from .request_sets import RequestSet


@contextmanager
def eager_decode(runner):
    """Rank 0 decodes without its captured graphs while the context is open."""
    graphs, runner.decode_graphs = runner.decode_graphs, None
    try:
        yield
    finally:
        runner.decode_graphs = graphs


class _Watcher:
    """Pairs each forward step's MoE times (rank 0) with the load snapshot that answers the
    ticket asked before the call that planned it. Snapshots come in step order (an overlapped
    core answers a call later), and so do the timer's forwards: a queue matches them."""

    def __init__(self, core, timer: MoETimer) -> None:
        self.core, self.timer = core, timer
        self.pending: set[int] = set()  # load tickets asked, not yet answered
        self._times: deque[list[float]] = deque()  # [L] MoE ms of each forward, not yet matched
        self.steps: list[tuple[ProbeStep, ExpertLoadSnapshot]] = []  # forward steps, in order

    def before_step(self) -> None:
        self.pending.add(self.core.request_expert_load(reset=True))

    def after_step(self, out: StepOutputs) -> None:
        self._times.extend(self.timer.take_calls())
        self.pending.difference_update(out.load_tickets)
        load = out.expert_load
        if load is not None and sum(load.tokens):  # the snapshot of a step that ran a forward
            self.steps.append((ProbeStep(self._times.popleft(), load.rank_tokens()), load))


def _settle(core, watcher: _Watcher) -> None:
    """Step until every asked-for load has been answered."""
    while watcher.pending:
        watcher.after_step(core.step())


def _reset_counters(core, max_steps: int = 8) -> None:
    ticket = core.request_expert_load(reset=True)
    for _ in range(max_steps):  # an overlapped core answers a step later
        if ticket in core.step().load_tickets:
            return
    raise RuntimeError(f"no step answered the expert-load request within {max_steps} steps")


@dataclass
class ProbeRun:
    prefill: list[tuple[ProbeStep, ExpertLoadSnapshot]]  # the run's first forward step
    decode: list[tuple[ProbeStep, ExpertLoadSnapshot]]  # every later one
    timing: RunTiming  # the run's phases, wall time


def probe_run(driver: CoreDriver, requests: RequestSet) -> ProbeRun:
    """One watched run of `requests`. Its prefill is the first forward step: the bench's engine
    limits admit and prefill every request in one step, checked here."""
    core = driver.core
    runner = core.executor.runner
    timer = MoETimer(runner.model)
    watcher = _Watcher(core, timer)
    with eager_decode(runner), timer.recording():
        _reset_counters(core)
        timer.take_calls()
        timing = driver.run(requests, watcher)
        _settle(core, watcher)
    steps = watcher.steps
    if not steps or steps[0][1].tokens[0] != requests.prompt_tokens:
        raise RuntimeError(f"the probe's first forward step routed {steps[0][1].tokens[0] if steps else 0} tokens, not "
                           f"the {requests.prompt_tokens} prompt tokens: the prefill did not run as one step")
    return ProbeRun(steps[:1], steps[1:], timing)


def summed_expert_tokens(steps: list[tuple[ProbeStep, ExpertLoadSnapshot]]) -> list[list[int]]:
    """[layer][expert] (token, expert) assignments over the steps (logical experts)."""
    rows = [[0] * len(row) for row in steps[0][1].expert_tokens]
    for _, load in steps:
        for acc, row in zip(rows, load.expert_tokens):
            for e, x in enumerate(row):
                acc[e] += x
    return rows


def phase_balance(steps: list[tuple[ProbeStep, ExpertLoadSnapshot]], phase_s: float) -> dict:
    """What EP users read for one phase, per step then averaged over its steps:
    balancedness per layer over ranks and over experts (aggregated over layers), (token,
    expert) pairs and active experts per rank per layer, ranks each token touches, and the
    balance bound (over `phase_s`, the phase's wall time in the probe run)."""
    if not steps:
        raise ValueError("the probe saw no forward step in this phase")
    num_layers = len(steps[0][1].tokens)
    ep = steps[0][1].ep_size
    rank_bal = [[0.0] * num_layers, [0] * num_layers]  # sums and counts per layer
    expert_bal = [[0.0] * num_layers, [0] * num_layers]
    pairs, active = [0.0] * ep, [0.0] * ep
    ranks_per_token = []
    for step, load in steps:
        for acc, values in ((rank_bal, balancedness(step.rank_pairs)), (expert_bal, balancedness(load.expert_tokens))):
            for layer, v in enumerate(values):
                if v is not None:
                    acc[0][layer] += v
                    acc[1][layer] += 1
        slots = load.expert_tokens if load.physical_tokens is None else load.physical_tokens  # [L][slots]
        per = len(slots[0]) // ep
        for r in range(ep):
            pairs[r] += sum(row[r] for row in step.rank_pairs) / num_layers
            active[r] += sum(sum(1 for x in row[r * per:(r + 1) * per] if x) for row in slots) / num_layers
        ranks_per_token.append(sum(load.ranks_touched) / max(sum(load.tokens), 1))
    n = len(steps)

    def mean_per_layer(acc):
        return [s / c if c else None for s, c in zip(*acc)]

    return {
        "steps": n,
        "balancedness": {"rank": aggregate_layers(mean_per_layer(rank_bal)),
                         "expert": aggregate_layers(mean_per_layer(expert_bal))},
        "tokens_per_rank": [p / n for p in pairs],  # (token, expert) pairs per layer per step
        "active_experts_per_rank": [a / n for a in active],  # experts (slots) with >= 1 token, per layer per step
        "ranks_per_token": sum(ranks_per_token) / n,
        "bound": balance_bound([s for s, _ in steps], phase_s),
    }
