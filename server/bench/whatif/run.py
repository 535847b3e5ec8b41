"""bench.mode=whatif: what each policy buys at EP N, from one device.

For every request set of the run (the main set: prefill and decode; the small set; each
sweep point) the real scheduler plans the EP-N steps (plans.py), the routing source gives the
router's choice per step and layer (sources.py), and for every compared variant (the policies
of bench.policies, and natural routing with EPLB at each bench.eplb_redundant_per_rank):

  measured   each rank's local work per step (rank_timer.py: the real runner on probe models)
             each rank's expert kernel per layer (expert_timer.py: the production kernel on
             the rows its layout gives it, its weights in bench.expert_precision; layout.py
             runs the policy, EPLB and dispatch code)
  modelled   the all-gather and the all-to-all of every MoE layer (wire.py, the profile)
  composed   per step as the engine runs it (compose.py), summed per phase

Decode steps are timed at most bench.whatif_decode_steps per set, evenly spread, each
standing for its share of the set's decode steps. EPLB places experts from the main set's
own natural loads (in-sample: the best a static placement can do).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ...config import ConfigError, RoutingConfig
from ...kernels.backend import KernelBackend
from ...launch_plan import build_launch_plan
from ...model.loader import read_model_spec
from ...model.spec import ModelLoadError
from ...moe.eplb.placement import ExpertPlacement
from ...moe.eplb.replica_map import ReplicaMap
from ...routing_setup import build_routing_policy
from ..experiment import build_sets, engine_app
from ..settings import BenchSettings
from .compose import PhaseTime, compose_step
from .expert_precision import expert_kernels
from .expert_timer import ExpertKernelTimer
from .layout import Layouter
from .phase_stats import PhaseLoads
from .plans import PlannedStep
from .rank_timer import RankWorkTimer
from .wire import layer_wire_seconds, load_interconnect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    label: str
    routing: dict  # the policy's routing.* mapping
    redundant: int | None  # EPLB redundant slots (None: no EPLB, experts in blocks)


def variants(settings: BenchSettings) -> list[Variant]:
    o, ep = settings.bench, settings.ep_size
    out = [Variant(label, dict(p), None) for label, p in zip(o.policy_labels, o.policies)]
    out += [Variant(f"natural+eplb{r * ep}", {"name": "natural"}, r * ep) for r in o.eplb_redundant_per_rank]
    return out


def dispatch_kind(name: str, ep_size: int) -> str:
    """parallel.dispatch as resolved by the launch plan -> the layout the what-if runs."""
    if name == "auto":
        return "local" if ep_size == 1 else "allgather"
    if name in ("local", "allgather"):
        return name
    raise ConfigError(f"parallel.dispatch={name}: the what-if models the dispatch the engine plans with (auto: "
                      "local at ep_size 1, the fixed-capacity all-gather above, or allgather forced)")


def timed_steps(steps: list[PlannedStep], max_decode: int, prefill: bool = True) -> list[tuple[PlannedStep, float]]:
    """Every prefill step (unless `prefill` is False: sets whose decode alone is reported);
    decode steps evenly spread, each weighted by the steps it stands for."""
    prefill = [(s, 1.0) for s in steps if not s.is_decode] if prefill else []
    decode = [s for s in steps if s.is_decode]
    if max_decode and len(decode) > max_decode:
        picks = np.linspace(0, len(decode) - 1, max_decode).round().astype(int)
        decode = [decode[i] for i in sorted(set(picks.tolist()))]
        weight = (len([s for s in steps if s.is_decode])) / len(decode)
        return prefill + [(s, weight) for s in decode]
    return prefill + [(s, 1.0) for s in decode]


def _resolve_device(settings: BenchSettings) -> torch.device:
    want = settings.parallel.device
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(want)


class WhatIf:
    def __init__(self, settings: BenchSettings, progress=None) -> None:
        self.settings, self.o, self.ep = settings, settings.bench, settings.ep_size
        try:
            self.spec = read_model_spec(settings.model)
            self.spec.check_ep_size(self.ep)
        except ModelLoadError as exc:
            raise ConfigError(f"parallel.ep_size: {exc}") from None
        self.device = _resolve_device(settings)
        self.dtype = getattr(torch, self.spec.dtype)
        self.wire = load_interconnect(self.o.interconnect)
        if self.wire.max_ep() is not None and self.ep > self.wire.max_ep():
            raise ConfigError(f"bench.interconnect={self.o.interconnect} describes {self.wire.max_ep()} GPUs; "
                              f"parallel.ep_size={self.ep} needs a multi-node profile (e.g. ib400_h100)")
        self.sets = build_sets(settings, self.spec.vocab_size)
        self.app = engine_app(settings, self.sets)
        # the engine's own resolution of this config at EP N (dispatch, kernels, max_model_len, rules)
        self.plan = build_launch_plan(self.app, ep_size=self.ep, spec=self.spec)
        self.kind = dispatch_kind(self.plan.dispatch.name, self.ep)
        self.kernels = KernelBackend.for_device(self.device, self.plan.kernels)
        self.variants = variants(settings)
        for v in self.variants:
            if v.redundant is not None and (self.spec.num_experts + v.redundant) % self.ep:
                raise ConfigError(f"EPLB with {v.redundant} redundant experts: {self.spec.num_experts + v.redundant} "
                                  f"slots do not split over ep_size={self.ep}")
        # bench.expert_precision: the experts' weight format, as the engine would decide it (fails early)
        # model.quantization=fp8 (random weights drawn as FP8 blocks) runs the experts as bench.expert_precision=fp8
        precision, key = self.o.expert_precision, "bench.expert_precision"
        if settings.model.quantization == "fp8":
            precision, key = "fp8", "model.quantization"
        self.expert_kernels = expert_kernels(precision, self.spec, self.kernels, self.device, key=key)
        self.progress = progress
        self.moe_layers = self.spec.num_moe_layers
        self.dense_layers = self.spec.num_layers - self.moe_layers
        self.ranks = RankWorkTimer(self.spec, engine=self.app.engine, ep_size=self.ep, kind=self.kind,
                                   num_slots=self.spec.num_experts, device=self.device, dtype=self.dtype,
                                   max_model_len=self.plan.max_model_len, seed=settings.model.seed,
                                   kernels=self.expert_kernels, cuda_graphs=self.plan.kernels.cuda_graphs,
                                   reps=max(3, self.o.whatif_reps // 2), wire=self.plan.dispatch.wire)
        self._expert_timers: dict[int, ExpertKernelTimer] = {}
        self.self_check: list = []

    def expert_timer(self, slots_per_rank: int) -> ExpertKernelTimer:
        if slots_per_rank not in self._expert_timers:
            self._expert_timers[slots_per_rank] = ExpertKernelTimer(self.spec, slots_per_rank, self.device, self.dtype,
                                                                    reps=self.o.whatif_reps, seed=self.settings.model.seed,
                                                                    kernels=self.expert_kernels,
                                                                    wire=self.plan.dispatch.wire)
        return self._expert_timers[slots_per_rank]

    def request_sets(self) -> list[tuple[str, object]]:
        out = [("main", self.sets.main)]
        if self.sets.small is not None:
            out.append(("small", self.sets.small))
        out += [(f"sweep{b}", s) for b, s in self.sets.sweep.items()]
        return out

    def wire_ms(self, rows: int) -> float:
        """One MoE layer's two collectives at `rows` rows per rank (ms)."""
        if self.kind == "local":
            return 0.0
        return 1e3 * layer_wire_seconds(self.wire, self.ep, rows, self.spec.hidden_size, self.spec.top_k, self.dtype,
                                        self.plan.dispatch.wire)

    def placements(self, source, steps: list[PlannedStep]) -> dict[int, ExpertPlacement]:
        """EPLB placements for every redundant count asked for, from the natural loads of `steps`."""
        wanted = sorted({v.redundant for v in self.variants if v.redundant is not None})
        if not wanted:
            return {}
        loads = torch.zeros(self.moe_layers, self.spec.num_experts, dtype=torch.float64)
        for step in steps:
            for layer in range(self.moe_layers):
                ids = source.router_output(step, layer).ids.reshape(-1).long()
                loads[layer] += torch.bincount(ids, minlength=self.spec.num_experts).cpu().double()
        nodes = max(1, -(-self.ep // self.wire.gpus_per_node))
        groups = self.settings.parallel.eplb_num_groups or self.spec.router_groups
        out = {}
        for r in wanted:
            try:
                out[r] = ExpertPlacement.balanced(loads.tolist(), num_experts=self.spec.num_experts, redundant=r,
                                                  ep_size=self.ep, policy=self.settings.parallel.eplb_policy,
                                                  num_groups=groups, num_nodes=nodes if self.ep % nodes == 0 else 1)
            except ValueError as exc:
                raise ConfigError(f"EPLB placement with {r} redundant experts: {exc}") from None
        return out

    def run_variant(self, variant: Variant, steps, timed, source, placement, prefix: str, phases: dict,
                    loads: dict) -> None:
        """Time `variant` over one request set's timed steps into phases[prefix + phase] and loads[...]."""
        spec = self.spec
        policy = build_routing_policy(RoutingConfig.from_dict(variant.routing), num_experts=spec.num_experts,
                                      top_k=spec.top_k, ep_size=self.ep, num_layers=self.moe_layers)
        replicas = None if placement is None else ReplicaMap(placement, self.device)
        layouter = Layouter(policy, num_experts=spec.num_experts, top_k=spec.top_k, ep_size=self.ep, kind=self.kind,
                            replicas=replicas, router_groups=spec.router_groups,
                            router_topk_groups=spec.router_topk_groups)
        slots = (spec.num_experts + (variant.redundant or 0)) // self.ep
        timer = self.expert_timer(slots if self.kind == "allgather" else spec.num_experts)
        self.ranks.switch(variant.routing)
        wanted = {s.index for s, _ in timed}
        local = [self.ranks.time_rank([s.ranks[r] for s in steps], wanted) for r in range(self.ep)]
        for step, weight in timed:
            rows = self.ranks.rows(step.ranks[0])
            name = prefix + step.phase
            phase_loads = loads.setdefault(name, PhaseLoads(self.moe_layers, self.ep))
            experts = np.zeros((self.moe_layers, self.ep))
            for layer in range(self.moe_layers):
                layout = layouter.layout(step, layer, source.router_output(step, layer), rows)
                for rank in range(self.ep):
                    experts[layer, rank] = timer.time(layout, rank)
                phase_loads.add(layer, layout, experts[layer], weight)
                if self.progress is not None:
                    self.progress.update(self.ep)
                if self.device.type == "cuda" and len(self.self_check) < 2 and layer == 0 and variant.label == "natural":
                    busiest = int(experts[0].argmax())
                    graphed, eager = timer.standalone_ms(layout, busiest)
                    self.self_check.append({"phase": name, "step": step.index, "rank": busiest,
                                            "rows": layout.kernel_rows(), "whatif_ms": float(experts[0, busiest]),
                                            "standalone_ms": graphed, "standalone_eager_ms": eager})
            phase_loads.end_step(weight)
            phase = phases.setdefault(name, PhaseTime())
            # eager steps: the host's time to issue one layer's expert call (its rows are the layout's)
            host = timer.host_ms(layout.kind, layout.kernel_rows()) if self.ranks.eager(step.ranks[0]) else 0.0
            phase.add(compose_step([local[r][step.index] for r in range(self.ep)], experts, self.wire_ms(rows),
                                   dense_layers=self.dense_layers, expert_host_ms=host), weight)
