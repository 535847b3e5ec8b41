"""The composition checked against the real engine at ep_size 1, in the same process.

At one rank nothing is modelled: the what-if's step time is measured local work plus measured
expert kernels, composed. The real EngineCore (the launcher, scheduler, runner and sampler
the server runs, natural routing) then runs the same request sets, `repeats` times after one
warm-up. Its runner carries the same StepClock the probes use, so each step's device time
(forward and sampler, after its inputs are staged) is read off the real engine: the prefill
step, and the mean decode step of each set. The wall time per step from the driver (the
time a client sees, host work included) is reported beside it. A second pass runs the same
engine with its experts taken out, which splits any gap between local work and experts.
"""
from __future__ import annotations

import statistics

from ..drive import CoreDriver
from .local_work import NoExpertsLocalDispatcher
from .rank_timer import StepClock


def _device_steps(core, runner, sets, repeats: int) -> tuple[dict, dict]:
    """The sets run `repeats` times after one warm-up -> (device ms per step, wall ms per step)
    lists per phase."""
    device: dict[str, list[float]] = {"prefill": [], "decode": [], "small_decode": []}
    wall: dict[str, list[float]] = {k: [] for k in device}
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
    return device, wall


def engine_reference(app, sets, predicted: dict, repeats: int) -> dict:
    """Per phase: the engine's step device time against the prediction, then the same engine
    with its experts taken out (NoExpertsLocalDispatcher swapped in, decode graphs captured
    again) against the predicted local work: where a gap lies, in the local work or in the
    experts."""
    from ...core.startup import build_engine_core

    core = build_engine_core(app)
    try:
        runner = core.executor.runner
        runner.clock = StepClock(runner.device)
        device, wall = _device_steps(core, runner, sets, repeats)
        runner.model.runtime.dispatcher = NoExpertsLocalDispatcher()
        runner.decode_graphs = runner.policies.recapture()
        local, _ = _device_steps(core, runner, sets, repeats)
    finally:
        core.shutdown(graceful=True)
    out = {}
    for phase, values in device.items():
        if not values or phase not in predicted or "natural" not in predicted[phase]:
            continue
        real, real_local = statistics.median(values), statistics.median(local[phase])
        p = predicted[phase]["natural"]
        per_step = p["step_ms"] / p["time_ms"] if p["time_ms"] else 0.0
        # the local work alone as a no-experts run shows it (host-bound or not), and the experts
        # by the same subtraction the engine's figure is made with
        pred_local = p["breakdown_ms"]["local_alone"] * per_step
        pred_experts = p["step_ms"] - pred_local
        out[phase] = {"engine_step_ms": real, "predicted_step_ms": p["step_ms"],
                      "predicted_over_engine": p["step_ms"] / real,
                      "engine_local_ms": real_local, "predicted_local_ms": pred_local,
                      "engine_experts_ms": real - real_local, "predicted_experts_ms": pred_experts,
                      "engine_wall_step_ms": statistics.median(wall[phase]), "engine_runs_ms": values}
    return out
