"""The composition checked against the real engine at ep_size 1, in the same process.

At one rank nothing is modelled: the what-if's step time is measured local work plus measured
expert kernels, composed. The real EngineCore (the launcher, scheduler, runner and sampler
the server runs, natural routing) then runs the same request sets, `repeats` times after one
warm-up. Its runner carries the same StepClock the probes use, so each step's device time
(forward and sampler, after its inputs are staged) is read off the real engine: the prefill
step, and the mean decode step of each set. The wall time per step from the driver (the
time a client sees, host work included) is reported beside it.
"""
from __future__ import annotations

import statistics

from ..drive import CoreDriver
from .rank_timer import StepClock


def engine_reference(app, sets, predicted: dict, repeats: int) -> dict:
    from ...core.startup import build_engine_core

    core = build_engine_core(app)
    device: dict[str, list[float]] = {"prefill": [], "decode": [], "small_decode": []}
    wall: dict[str, list[float]] = {k: [] for k in device}
    try:
        runner = core.executor.runner
        runner.clock = StepClock(runner.device)
        driver = CoreDriver(core)
        runs = [("", sets.main)] + ([("small_", sets.small)] if sets.small is not None else [])
        for rnd in range(repeats + 1):
            for prefix, requests in runs:
                timing = driver.run(requests)
                steps = runner.clock.take_ms()  # this run's forward steps: the prefill first
                if rnd == 0:
                    continue  # warm-up: compiles, graphs
                decode_steps = requests.output_len - 1
                if not prefix:
                    device["prefill"].append(steps[0])
                    wall["prefill"].append(timing.prefill_s * 1e3)
                device[prefix + "decode"].append(statistics.mean(steps[-decode_steps:]))
                wall[prefix + "decode"].append(timing.decode_s * 1e3 / decode_steps)
    finally:
        core.shutdown(graceful=True)
    out = {}
    for phase, values in device.items():
        if not values or phase not in predicted or "natural" not in predicted[phase]:
            continue
        real = statistics.median(values)
        pred = predicted[phase]["natural"]["step_ms"]
        out[phase] = {"engine_step_ms": real, "predicted_step_ms": pred, "predicted_over_engine": pred / real,
                      "engine_wall_step_ms": statistics.median(wall[phase]), "engine_runs_ms": values}
    return out
