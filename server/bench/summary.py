"""The engine-mode run's measurements -> its JSON document (schema epserve-bench/balance-1).

  phases[phase][policy]   tok_s and tok_s_per_gpu: median, 95% CI, spread over repetitions;
                          ratio_to_natural: the same of the per-repetition paired ratios
  sweep[policy][batch]    decode tok/s and its ratio to natural at each per-rank batch
  balance[phase][policy]  the probe's per-rank figures, balancedness and balance bound, and
                          vs_bound: the policy's measured ratio against natural's bound
  load                    natural's [layer][expert] counts in the probe (an EPLB statistics input)
"""
from __future__ import annotations

import platform
import time

from .bound import uplift_over_bound
from .stats import describe, paired_ratios

BASELINE = "natural"


def _policy_block(values: list[float], base: list[float], ep: int) -> dict:
    tok = describe(values)
    return {"tok_s": tok, "tok_s_per_gpu": {k: tok[k] / ep for k in ("median", "min", "max")} | {
            "ci95": [x / ep for x in tok["ci95"]]},
            "ratio_to_natural": describe(paired_ratios(values, base))}


def build_document(settings, spec, sets, engine_info: dict, phases: dict, sweep: dict, balance: dict,
                   loads: dict[str, list[list[int]]], switched: dict[str, str], served: dict | None) -> dict:
    o = settings.bench
    ep = settings.ep_size
    labels = o.policy_labels
    base = labels[[p["name"] for p in o.policies].index(BASELINE)]
    phase_names = [p for p in ("prefill", "decode", "small_decode", "e2e") if phases[base][p]]
    doc_phases = {p: {label: _policy_block(phases[label][p], phases[base][p], ep) for label in labels}
                  for p in phase_names}
    doc_sweep = {label: {str(b): _policy_block(vals, sweep[base][b], ep) for b, vals in sweep[label].items()}
                 for label in labels if sweep[label]}
    for p, per_policy in balance.items():
        if not per_policy:
            continue
        bound = per_policy[base]["bound"]["speedup_bound"]
        for label, info in per_policy.items():
            info["vs_bound"] = uplift_over_bound(doc_phases[p][label]["ratio_to_natural"]["median"], bound)
    lengths = sets.main.lengths
    return {
        "schema": "epserve-bench/balance-1",
        "mode": "engine (launcher, scheduler, model runner; policies switched in place, interleaved)",
        "tag": settings.tag(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": settings.command,
        "device": _device(engine_info["device"], ep),
        "model": {"name": settings.model.name, "architecture": spec.architecture, "layers": spec.num_layers,
                  "moe_layers": spec.num_moe_layers, "experts": spec.num_experts, "top_k": spec.top_k,
                  "hidden": spec.hidden_size, "moe_intermediate": spec.moe_intermediate_size, "dtype": str(spec.dtype),
                  "weights": "random (model.shape)" if settings.model.shape is not None else (settings.model.path or settings.model.name)},
        "parallel": {"ep_size": ep, "backend": settings.parallel.backend,
                     "eplb": settings.parallel.redundant_experts if settings.parallel.eplb_enabled else None},
        "workload": {"kind": o.workload, "batch": sets.main.batch, "input_len": o.input_len, "output_len": o.output_len,
                     "lengths": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths),
                                 "distinct": len(set(lengths))},
                     "prompt_tokens": sets.main.prompt_tokens, "small_batch": o.small_batch,
                     "sweep_per_rank_batches": list(sets.sweep), "sweep_output_len": o.sweep_output_len,
                     "repeats": o.repeats, "warmup": o.warmup, "prefill_runs": o.prefill_runs, "sweep_repeats": o.sweep_repeats if sets.sweep else 0,
                     "order": "interleaved: every round runs each policy once, in the order listed"},
        "policies": labels,
        "policy_reprs": switched,
        "baseline": base,
        "engine": engine_info,
        "phases": doc_phases,
        "sweep": doc_sweep,
        "balance": {p: v for p, v in balance.items() if v},
        # natural's [layer][expert] counts over its probe run of the main set: the expert-load
        # statistics EPLB places from (server/moe/eplb/build_stats.py reads this key)
        "load": {"policy": base, "expert_tokens": loads[base], "counted": "probe run of the main set"} if base in loads else None,
        "served": served,
    }


def _device(name: str, ep: int) -> dict:
    import torch

    info = {"type": "cuda" if name.startswith("cuda") else "cpu", "count": ep, "torch": torch.__version__,
            "python": platform.python_version()}
    info["name"] = torch.cuda.get_device_name(0) if info["type"] == "cuda" else (platform.processor() or platform.machine())
    return info
