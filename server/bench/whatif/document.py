"""Run the what-if end to end and build its document (JSON-ready), saying what was measured
and what was modelled. Per phase and compared variant: predicted tok/s and step time, the
ratio to natural, the time split (local work, experts, wire), the share spent waiting for
stragglers, loads per rank, and two bounds on what rank balance could buy: the measured
ceiling (every layer's experts at the mean rank's time) and the linear one (bound.py: MoE time
proportional to the busiest rank's pairs). At ep_size 1 with bench.whatif_validate the real
engine runs the same sets afterwards in the same process (validate.py).
"""
from __future__ import annotations

import datetime
import gc
import time

import torch

from ..bound import linear_bound
from ..settings import BenchSettings
from .expert_precision import precision_note
from .plans import plan_steps
from .run import WhatIf, timed_steps
from .sources import SOURCES, SourceRequest

MEASURED = ("each rank's local work per step: attention, norms, router, the policy, the dispatcher's pack and "
            "reduce, shared experts, embedding, head and sampler (the real ModelRunner on probe models, CUDA "
            "graphs for decode as the engine replays them)",
            "each rank's expert kernel per MoE layer on the rows its dispatch layout gives it (the production "
            "kernel, L2 flushed before every replay)")
MODELLED = ("the all-gather and all-to-all of every MoE layer (alpha-beta per collective, the interconnect profile)",
            "one layer's expert weights stand for every layer's; the router's choice comes from the routing source")


def _tqdm(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="what-if (policy, layer, rank)", unit="kernel", mininterval=2.0)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None


def _tokens(name: str, requests) -> int:
    return requests.prompt_tokens if name.endswith("prefill") else requests.decode_tokens


def run_whatif(settings: BenchSettings) -> dict:
    t0 = time.perf_counter()
    w = WhatIf(settings)
    o, engine = settings.bench, w.app.engine
    sets = w.request_sets()
    plans = {name: plan_steps(reqs, ep_size=w.ep, max_num_seqs=engine.max_num_seqs,
                              max_num_batched_tokens=engine.max_num_batched_tokens,
                              kv_block_size=engine.kv_block_size, kv_cache_tokens=engine.kv_cache_tokens,
                              max_queue=engine.max_queue) for name, reqs in sets}
    timed = {name: timed_steps(steps, o.whatif_decode_steps, prefill=name == "main") for name, steps in plans.items()}
    sources = {name: SOURCES.get(o.routing_source)(SourceRequest(settings, w.spec, reqs, plans[name], w.device))
               for name, reqs in sets}
    placements = w.placements(sources["main"], plans["main"])
    w.progress = _tqdm(len(w.variants) * sum(len(t) for t in timed.values()) * w.moe_layers * w.ep)
    results = {}
    for variant in w.variants:
        phases, loads = {}, {}
        for name, _ in sets:
            prefix = "" if name == "main" else f"{name}_"
            w.run_variant(variant, plans[name], timed[name], sources[name],
                          placements.get(variant.redundant), prefix, phases, loads)
        results[variant.label] = (phases, loads)
    if w.progress is not None:
        w.progress.close()
    tokens = {("" if name == "main" else f"{name}_") + phase: _tokens(phase, reqs)
              for name, reqs in sets for phase in ("prefill", "decode")}
    doc = _document(settings, w, sources["main"].note, results, tokens, time.perf_counter() - t0)
    if o.whatif_validate and w.ep == 1:
        from .validate import engine_reference

        app, main_sets = w.app, w.sets
        del w, results, sources
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        doc["validation"] = engine_reference(app, main_sets, doc["phases"], o.repeats)
    return doc


def _document(settings: BenchSettings, w: WhatIf, source_note: str, results: dict, tokens: dict, wall_s: float) -> dict:
    phases: dict[str, dict] = {}
    for label, (times, loads) in results.items():
        for name, phase in times.items():
            summary = phase.summary(tokens.get(name, 0))
            summary.update(loads[name].summary())
            busiest, mean = loads[name].max_pairs, loads[name].mean_pairs
            moe = summary["breakdown_ms"]["experts"] + summary["breakdown_ms"]["wire"]
            summary["linear_bound"] = linear_bound(summary["time_ms"] / 1e3, moe / 1e3, busiest, mean)["speedup_bound"]
            phases.setdefault(name, {})[label] = summary
    for name, rows in phases.items():
        base = rows.get("natural", {}).get("tok_s")
        for summary in rows.values():
            summary["x_natural"] = summary["tok_s"] / base if base else None
    spec, o = w.spec, settings.bench
    timers = list(w._expert_timers.values())
    return {
        "kind": "whatif", "emulated": True, "command": settings.command,
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else "cpu",
        "model": {"name": settings.model.name, "layers": spec.num_layers, "moe_layers": spec.num_moe_layers,
                  "experts": spec.num_experts, "top_k": spec.top_k, "hidden": spec.hidden_size, "dtype": spec.dtype,
                  "expert_precision": o.expert_precision,
                  "expert_weights": precision_note(timers[0].experts) if timers else o.expert_precision},
        "ep_size": w.ep, "dispatch": w.kind, "dispatch_wire": w.plan.dispatch.wire, "decode_graphs": w.ranks.graphs,
        "interconnect": {"name": w.wire.name, "source": w.wire.source, "gpus_per_node": w.wire.gpus_per_node},
        "routing_source": source_note,
        "workload": {"name": o.workload, "batch": o.batch, "input_len": o.input_len, "output_len": o.output_len,
                     "lengths": list(w.sets.main.lengths),
                     "small_batch": o.small_batch, "sweep": list(o.sweep), "decode_steps_timed": o.whatif_decode_steps},
        "engine": {"max_num_seqs": w.app.engine.max_num_seqs,
                   "max_num_batched_tokens": w.app.engine.max_num_batched_tokens},
        "measured": list(MEASURED) + [w.ranks.eager_note()], "modelled": list(MODELLED),
        "phases": phases, "self_check": w.self_check,
        "expert_replay_floor_ms": timers[0].floor_ms if timers else 0.0,
        "cost": {"wall_s": wall_s, "expert_shapes_timed": sum(len(t.cache) for t in timers)},
    }
