"""bench.mode=engine: what does balance buy, measured on the product's own path.

The launcher starts the EP ranks once and they load their weights once
(server/engine/launcher.build_engine_core); the bench then drives that EngineCore as the
server does (drive.py). Between runs the routing policy is switched in place on every rank
at once (a step plan's `routing`; decode graphs are captured per policy on first use), and
the policies run interleaved, A B C A B C ..., so slow drift of the machine lands on every
policy alike and each repetition gives a paired ratio to natural:

  warm-up     bench.warmup rounds of every run below (kernels compile, graphs get captured)
  phases      bench.repeats rounds; each policy: the main set (prefill, decode, e2e) and
              bench.prefill_runs prefill-only runs of it (the round's prefill figure is the
              median of these), then the small set (decode at bench.small_batch)
  sweep       bench.sweep_repeats rounds; each policy: decode at every per-rank batch of bench.sweep
  probe       one eager run of the main and small sets per policy, watched step by step (probe.py)
  served      (bench.served) the main set through gRPC (served.py), after the ranks are gone

-> the run's document (summary.py builds it from these measurements).
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace

from ..config import AppConfig, ConfigError, RoutingConfig
from ..launch_plan import build_launch_plan, read_spec
from .drive import CoreDriver
from .probe import phase_balance, probe_run, summed_expert_tokens
from .request_sets import RequestSet, build_request_set
from .settings import BenchSettings
from .static_run import NO_MULTICAST

PHASES = ("prefill", "decode", "small_decode")


@dataclass(frozen=True)
class RequestSets:
    main: RequestSet
    small: RequestSet | None
    sweep: dict[int, RequestSet]  # per-rank batch -> its set

    def all(self) -> list[RequestSet]:
        return [self.main, *([self.small] if self.small else []), *self.sweep.values()]


def build_sets(settings: BenchSettings, vocab_size: int) -> RequestSets:
    o, ep = settings.bench, settings.ep_size

    def make(batch: int, output_len: int, seed: int) -> RequestSet:
        return build_request_set(o.workload, batch=batch, input_len=o.input_len, output_len=output_len,
                                 vocab_size=vocab_size, seed=seed, spread=o.length_spread)
    return RequestSets(main=make(o.batch, o.output_len, o.seed),
                       small=make(o.small_batch, o.output_len, o.seed + 1) if o.small_batch else None,
                       sweep={b: make(b * ep, o.sweep_output_len, o.seed + 2) for b in o.sweep})


def engine_app(settings: BenchSettings, sets: RequestSets) -> AppConfig:
    """The engine configuration the sets need: every set admitted at once (a rank holds at most
    max_num_seqs sequences, the largest set's per-rank share), its prefill in one step, the KV
    cache sized for it. The same settings serve the served run."""
    ep, o = settings.ep_size, settings.bench
    per_rank = max(-(-s.batch // ep) for s in sets.all())
    longest = max(s.max_total_len for s in sets.all())
    if longest > settings.model.max_model_len:
        raise ConfigError(f"the bench's longest request needs {longest} tokens (prompt + output) but "
                          f"model.max_model_len={settings.model.max_model_len}")
    blocks = per_rank * -(-longest // o.block_size)
    data = settings.to_dict()
    natural = next(p for p in o.policies if p["name"] == "natural")
    return AppConfig.from_dict({
        "model": data["model"], "parallel": data["parallel"], "routing": dict(natural),
        "engine": {"max_num_seqs": per_rank, "max_num_batched_tokens": per_rank * max(max(s.lengths) for s in sets.all()),
                   "kv_block_size": o.block_size, "kv_cache_tokens": (blocks + blocks // 20 + 8) * o.block_size,
                   "gpu_memory_utilization": 0,  # the cache the workload needs, sized above, on any device
                   "max_queue": max(s.batch for s in sets.all())},
    })


def check_policies(app: AppConfig, policies, spec) -> None:
    """The launch plan of every compared policy, before any rank starts (ConfigError)."""
    for routing in policies:
        try:
            build_launch_plan(replace(app, routing=RoutingConfig.from_dict(routing)), spec=spec)
        except ConfigError as exc:
            raise ConfigError(f"bench.policies: {routing}: {exc}") from None


class _Rounds:
    """The measurements of one experiment, filled in round by round."""

    def __init__(self, settings: BenchSettings, sets: RequestSets, driver: CoreDriver) -> None:
        self.o, self.sets, self.driver = settings.bench, sets, driver
        self.labels = self.o.policy_labels
        self.phases = {label: {p: [] for p in (*PHASES, "e2e")} for label in self.labels}
        self.sweep = {label: {b: [] for b in sets.sweep} for label in self.labels}
        self.balance: dict = {p: {} for p in PHASES}
        self.loads: dict[str, list[list[int]]] = {}  # policy -> [layer][expert] of its main-set probe run
        self.switched: dict[str, str] = {}  # policy -> the repr every rank reported
        self._prefill_only = replace(sets.main, output_len=1)

    def _run(self, requests: RequestSet):
        gc.collect()  # between runs, not inside one
        return self.driver.run(requests)

    def phase_round(self, timed: bool) -> None:
        sets = self.sets
        for label, routing in zip(self.labels, self.o.policies):
            self.switched[label] = self.driver.switch_policy(routing)
            main = self._run(sets.main)
            prefill = [main.prefill_s] + [self._run(self._prefill_only).prefill_s for _ in range(self.o.prefill_runs)]
            small = self._run(sets.small) if sets.small else None
            if not timed:
                for points in sets.sweep.values():  # every shape the sweep will see, once
                    self._run(points)
                continue
            rec = self.phases[label]
            rec["prefill"].append(sets.main.prompt_tokens / statistics.median(prefill))
            rec["decode"].append(sets.main.decode_tokens / main.decode_s)
            rec["e2e"].append(sets.main.batch * sets.main.output_len / main.total_s)
            if small is not None:
                rec["small_decode"].append(sets.small.decode_tokens / small.decode_s)

    def sweep_round(self) -> None:
        for label, routing in zip(self.labels, self.o.policies):
            self.driver.switch_policy(routing)
            for b, points in self.sets.sweep.items():
                self.sweep[label][b].append(points.decode_tokens / self._run(points).decode_s)

    def probe(self) -> None:
        for label, routing in zip(self.labels, self.o.policies):
            self.driver.switch_policy(routing)
            main = probe_run(self.driver, self.sets.main)
            self.loads[label] = summed_expert_tokens(main.prefill + main.decode)
            self.balance["prefill"][label] = phase_balance(main.prefill, main.timing.prefill_s)
            self.balance["decode"][label] = phase_balance(main.decode, main.timing.decode_s)
            if self.sets.small:
                small = probe_run(self.driver, self.sets.small)
                self.balance["small_decode"][label] = phase_balance(small.decode, small.timing.decode_s)


def run_experiment(settings: BenchSettings) -> dict:
    from ..core.startup import build_engine_core
    from .summary import build_document

    os.environ.update(NO_MULTICAST)
    o = settings.bench
    spec = read_spec(AppConfig(model=settings.model))
    sets = build_sets(settings, spec.vocab_size)
    app = engine_app(settings, sets)
    check_policies(app, o.policies, spec)
    t_start = time.perf_counter()
    core = build_engine_core(app)
    load_s = time.perf_counter() - t_start
    rounds = _Rounds(settings, sets, CoreDriver(core))
    try:
        for rnd in range(o.warmup + o.repeats):
            rounds.phase_round(timed=rnd >= o.warmup)
            _progress(f"round {rnd + 1}/{o.warmup + o.repeats} ({'timed' if rnd >= o.warmup else 'warm-up'})", t_start)
        for rnd in range(o.sweep_repeats if sets.sweep else 0):
            rounds.sweep_round()
            _progress(f"sweep round {rnd + 1}/{o.sweep_repeats}", t_start)
        if o.probe:
            rounds.probe()
            _progress("probe", t_start)
        engine_info = _engine_info(core, app, load_s)
    finally:
        core.shutdown(graceful=True)
    served = None
    if o.served:  # the ranks are gone: the server gets the memory they held
        from .served import run_served

        natural = rounds.labels[[p["name"] for p in o.policies].index("natural")]
        served = run_served(settings, app, sets.main, rounds.phases[natural]["e2e"])
    return build_document(settings, spec, sets, engine_info, rounds.phases, rounds.sweep, rounds.balance, rounds.loads,
                          rounds.switched, served)


def _engine_info(core, app: AppConfig, load_s: float) -> dict:
    runner = core.executor.runner
    graphs = runner.decode_graphs
    return {"load_s": load_s, "ep_size": core.executor.num_ranks,
            "engine": {"max_num_seqs": app.engine.max_num_seqs, "max_num_batched_tokens": app.engine.max_num_batched_tokens,
                       "kv_cache_tokens": app.engine.kv_cache_tokens, "kv_block_size": app.engine.kv_block_size,
                       "overlap": app.engine.overlap},
            "decode_graphs": f"captured per policy: buckets {graphs.buckets}" if graphs is not None else "eager",
            "device": str(runner.device)}


def _progress(what: str, t_start: float) -> None:
    print(f"epserve-bench: {what} done at {time.perf_counter() - t_start:.1f} s", file=sys.stderr, flush=True)
