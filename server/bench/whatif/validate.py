"""The composition checked against the real engine at ep_size 1, in the same process.

At one rank nothing is modelled: the what-if's step time is measured local work plus measured
expert kernels, composed. The real EngineCore (the launcher, scheduler, runner and sampler
the server runs, natural routing) then runs the same request sets, `repeats` times after one
warm-up, and its step times are compared with the prediction: the prefill step (submission
to first token) and the mean decode step of each set (decode time over its decode steps).
"""
from __future__ import annotations

import statistics

from ..drive import CoreDriver


def engine_reference(app, sets, predicted: dict, repeats: int) -> dict:
    from ...engine.launcher import build_engine_core

    core = build_engine_core(app)
    measured: dict[str, list[float]] = {"prefill": [], "decode": [], "small_decode": []}
    try:
        driver = CoreDriver(core)
        runs = [("", sets.main)] + ([("small_", sets.small)] if sets.small is not None else [])
        for rnd in range(repeats + 1):
            for prefix, requests in runs:
                timing = driver.run(requests)
                if rnd == 0:
                    continue  # warm-up: compiles, graphs
                if not prefix:
                    measured["prefill"].append(timing.prefill_s * 1e3)
                measured[prefix + "decode"].append(timing.decode_s * 1e3 / (requests.output_len - 1))
    finally:
        core.shutdown(graceful=True)
    out = {}
    for phase, values in measured.items():
        if not values or phase not in predicted or "natural" not in predicted[phase]:
            continue
        real = statistics.median(values)
        pred = predicted[phase]["natural"]["step_ms"]
        out[phase] = {"engine_step_ms": real, "predicted_step_ms": pred, "predicted_over_engine": pred / real,
                      "engine_runs_ms": values}
    return out
