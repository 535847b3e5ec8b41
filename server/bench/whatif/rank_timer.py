"""Each EP rank's own work per step, measured: the real ModelRunner on probe models.

Three probes of the served model (local_work.probe_spec), each driven through a real
ModelRunner with the rank's own step plans in order (slot fills, block appends, decode-graph
buckets, padding, the sampler), the experts and collectives taken out:

  base   one MoE layer                      F1 = edge + M
  moe    two MoE layers                     F2 = edge + 2M     -> M = F2 - F1, edge = F1 - M
  dense  one dense layer, then one MoE one  Fd = edge + D + M  -> D = Fd - F1 (models with dense layers)

M is one MoE layer's local work (attention, norms, gate, router, the policy under test, the
dispatcher's pack and reduce, shared experts), D one dense layer, edge the rest of the step
(embedding, final norm, head, sampler). The runner's clock brackets the device work of a
step after its inputs are staged (engine.overlap hides the staging behind the previous step).
A step whose shape was timed already (prefill: the same rows; decode: the same bucket, rows
and mean context to 16 tokens) reuses the time and only applies its slot updates. A timed
step is run once to warm (Triton compiles stay out), then `reps` times with the probes
interleaved, and the median counts. A difference of two timings that noise makes negative
counts as 0.
"""
from __future__ import annotations

import time
from dataclasses import astuple, dataclass

import numpy as np
import torch

from ...worker.model_runner import ModelRunner
from ...worker.step_plan import RankPlan
from ...model.causal_lm import MoECausalLM
from ...model.random_weights import init_random_weights
from ...moe.routing import build_policy
from .local_work import NoExpertsLocalDispatcher, NoWireGatherDispatcher, has_dense_layers, probe_spec


class StepClock:
    """start() / stop() around each step's device work (ModelRunner.clock): CUDA events, or the
    host clock on CPU. Keeps every interval until `take_ms`.

    `hold_ms` > 0 (CUDA): start() first queues a sleep kernel of that length, so the host issues
    the whole step while the GPU is still asleep and the events bracket only the GPU's own work
    (busy time, no launch gaps); the host's issue time is kept beside it (`take_host_ms`). An
    eager step's time is then max(host, GPU) in the composition, where the host and the
    kernels of other layers overlap as they do in the engine."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.hold_ms = 0.0
        self._cycles_per_ms = 0.0
        self._open = None
        self._intervals: list[tuple] = []
        self._host: list[float] = []
        self._host_start = 0.0

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _sleep_cycles(self, ms: float) -> int:
        if not self._cycles_per_ms:  # calibrated once: GPU clock cycles per ms of the sleep kernel
            probe = 2_000_000
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(probe // 10)  # warm
            a.record()
            torch.cuda._sleep(probe)
            b.record()
            b.synchronize()
            self._cycles_per_ms = probe / max(a.elapsed_time(b), 1e-3)
        return int(ms * self._cycles_per_ms)

    def start(self) -> None:
        if self.cuda and self.hold_ms > 0:
            torch.cuda._sleep(self._sleep_cycles(self.hold_ms))
        self._host_start = time.perf_counter()
        self._open = self._mark()

    def stop(self) -> None:
        self._intervals.append((self._open, self._mark()))
        self._host.append((time.perf_counter() - self._host_start) * 1e3)

    def take_ms(self) -> list[float]:
        """ms of every step since the last take (synchronises), oldest first."""
        if self.cuda and self._intervals:
            self._intervals[-1][1].synchronize()
        out = [a.elapsed_time(b) if self.cuda else (b - a) * 1e3 for a, b in self._intervals]
        self._intervals.clear()
        self._host.clear()
        return out

    def take_host_ms(self) -> list[float]:
        """Host ms from start() to stop() of every step since the last take; call before take_ms."""
        return list(self._host)


@dataclass(frozen=True)
class RankStepTimes:
    """One rank's measured local work in one step (ms). Eager steps on CUDA: the GPU's busy
    time, and the host's issue time in the host_ fields; graph replays and CPU: the step's
    time, host_ fields 0."""

    edge_ms: float  # embedding, final norm, head, sampler
    moe_layer_ms: float  # one MoE layer without its experts and collectives
    dense_layer_ms: float  # one dense decoder layer (0 where the model has none)
    host_edge_ms: float = 0.0
    host_moe_layer_ms: float = 0.0
    host_dense_layer_ms: float = 0.0


def shape_key(plan: RankPlan) -> tuple:
    """What a rank step's local work depends on (see the module docstring)."""
    b = plan.batch
    if plan.decode_batch is not None:
        ctx = int(b.context_lens.sum()) // max(16 * b.num_seqs, 1)
        return ("decode", plan.decode_batch, b.num_seqs, ctx, plan.ep_rows)
    return ("prefill", tuple(b.query_lens.tolist()), tuple((b.start_pos // 16).tolist()), plan.ep_rows)


class RankWorkTimer:
    """The probes of one model at one simulated EP size, switched between policies in place."""

    def __init__(self, spec, *, engine, ep_size: int, kind: str, num_slots: int, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, seed: int = 0, kernels=None,
                 cuda_graphs: bool | None = None, reps: int = 5, wire: str = "bf16") -> None:
        """`kernels` (KernelBackend) and `cuda_graphs`: the launch plan's choices, as the engine's;
        `wire`: parallel.dispatch_wire (fp8: the rows' quantise, and their dequantise unless the
        experts are FP8, are local work);
        `reps`: timed runs per step shape and probe (the median counts)."""
        self.device = device
        self.reps = max(1, reps)
        self.kind = kind
        self.runners: dict[str, ModelRunner] = {}
        shared = None
        layouts = {"base": (0, 1), "moe": (0, 2)}
        if has_dense_layers(spec):
            layouts["dense"] = (1, 1)
        for name, (dense, moe) in layouts.items():
            cut = probe_spec(spec, dense, moe)
            model = MoECausalLM(cut, policy=build_policy("natural"), ep_rank=0, ep_size=cut.num_experts,
                                dtype=dtype, device=device, kernels=kernels)
            model.runtime.dispatcher = (NoExpertsLocalDispatcher() if kind == "local"
                                        else NoWireGatherDispatcher(ep_size, num_slots, wire))
            init_random_weights(model, seed)
            if shared is None:
                shared = model
            else:  # one embedding and head for every probe: they are the largest tensors
                model.model.embed_tokens = shared.model.embed_tokens
                model.lm_head = shared.lm_head
            self.runners[name] = ModelRunner(
                model.eval(), rank=0, num_blocks=engine.kv_cache_tokens // engine.kv_block_size,
                block_size=engine.kv_block_size, device=device, max_num_seqs=engine.max_num_seqs,
                max_model_len=max_model_len, max_num_batched_tokens=engine.max_num_batched_tokens,
                cuda_graphs=cuda_graphs)
            self.runners[name].clock = StepClock(device)
        self._cache: dict[tuple, dict[str, tuple[float, float]]] = {}
        self._eager_off = False  # set when a step synchronised inside: host and GPU not separable

    @property
    def graphs(self) -> bool:
        """Decode runs as CUDA graphs here (so the engine would, on this device)."""
        return self.runners["base"].decode_graphs is not None

    def rows(self, plan: RankPlan) -> int:
        """The step's common MoE row count, as the engine's runner picks it."""
        graphs = self.runners["base"].decode_graphs
        if graphs is not None and plan.decode_batch is not None:
            bucket = graphs.bucket_for(plan.decode_batch)
            if bucket is not None:
                return bucket
        return plan.ep_rows

    def switch(self, routing: dict) -> None:
        """Every probe to the policy `routing` names (its decode graphs captured with it)."""
        self._cache.clear()
        for runner in self.runners.values():
            runner.decode_graphs = runner.policies.switch(routing)

    def _apply(self, plan: RankPlan) -> None:
        """A step not run here still fills and grows slots: later steps read those tables."""
        for runner in self.runners.values():
            runner.slots.apply(plan.batch.fills, plan.batch.appends)

    def eager(self, plan: RankPlan) -> bool:
        """Whether the runner runs this step eagerly on CUDA (not a decode-graph replay): its host
        issue time then matters beside the GPU's (StepClock.hold_ms)."""
        if self.device.type != "cuda" or self._eager_off:
            return False
        graphs = self.runners["base"].decode_graphs
        return graphs is None or plan.decode_batch is None or graphs.bucket_for(plan.decode_batch) is None

    def eager_note(self) -> str:
        """How eager steps' local work was timed (for the document's `measured` list)."""
        if self.device.type != "cuda":
            return "eager steps on the host clock (CPU: host and device are one)"
        if self._eager_off:
            return ("eager steps as a whole on an idle GPU: a step synchronised inside, so the GPU's busy time "
                    "and the host's issue time could not be told apart (the host's launch gaps are counted)")
        return "eager steps' GPU busy time and host issue time apart (the step takes the longer chain)"

    def _measure(self, plan: RankPlan) -> dict[str, tuple[float, float]]:
        """Every probe on `plan`: one warm run each, then `reps` rounds, the probes interleaved
        in each (drift in clocks or load touches them alike); the median per probe of (device
        ms, host ms). A layer's time is a difference of two probes multiplied by the layer
        count, so a single noisy run would be magnified that many times. Eager CUDA steps run
        behind a sleep (StepClock.hold_ms) a little longer than the warm run took, so the
        device figure is busy time and the host figure issue time."""
        eager = self.eager(plan)
        hold = {}
        for name, runner in self.runners.items():
            runner.run(plan)  # compiles and warms; the slot updates it repeats are idempotent
            hold[name] = 1.5 * runner.clock.take_ms()[-1] + 0.5 if eager else 0.0
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in self.runners}
        for _ in range(self.reps):
            for name, runner in self.runners.items():
                runner.clock.hold_ms = hold[name]
                runner.run(plan)
                host = runner.clock.take_host_ms()[-1] if eager else 0.0
                samples[name].append((runner.clock.take_ms()[-1], host))
                runner.clock.hold_ms = 0.0
        if eager and any(h >= 0.8 * hold[name] for name, v in samples.items() for _, h in v):
            # the host waited for the GPU inside the step (a sync): the sleep was in its issue
            # time too, so issue and busy time cannot be told apart; time the step as a whole
            self._eager_off = True
            return self._measure(plan)
        return {name: (float(np.median([d for d, _ in v])), float(np.median([h for _, h in v])))
                for name, v in samples.items()}

    def time_rank(self, plans: list[RankPlan], timed: set[int]) -> dict[int, RankStepTimes]:
        """One rank's plans in step order -> its local work at the positions in `timed` (the
        other steps only apply their slot updates, as the rank's runner would)."""
        out = {}
        for i, plan in enumerate(plans):
            if i not in timed:
                self._apply(plan)
                continue
            key = shape_key(plan)
            ms = self._cache.get(key)
            if ms is None:
                ms = self._measure(plan)
                self._cache[key] = ms
            else:
                self._apply(plan)
            parts = [_split(ms, k) for k in (0, 1)]  # (edge, layer, dense) on the device, then on the host
            out[i] = RankStepTimes(*parts[0], *parts[1])
        return out


def _split(ms: dict[str, tuple[float, float]], k: int) -> tuple[float, float, float]:
    """Probe times (field k: device or host) -> (edge, MoE layer, dense layer) ms."""
    layer = max(ms["moe"][k] - ms["base"][k], 0.0)
    dense = max(ms["dense"][k] - ms["base"][k], 0.0) if "dense" in ms else 0.0
    return max(ms["base"][k] - layer, 0.0), layer, dense


def mean_times(times: list[RankStepTimes]) -> RankStepTimes:
    """Field-wise mean (for reports)."""
    if not times:
        return RankStepTimes(0.0, 0.0, 0.0)
    arr = np.array([astuple(t) for t in times])
    return RankStepTimes(*arr.mean(0).tolist())
