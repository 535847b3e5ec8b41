"""BenchSettings: the benchmark's own knobs (`bench.*`) plus the server's model/routing/parallel
sections, validated once below the Hydra entry point and passed to rank processes as is."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ..config import AppConfig, ConfigError, ModelConfig, ParallelConfig, RoutingConfig, thaw

HF_CACHES = ("static", "dynamic")
MODES = ("engine", "static", "whatif")
ROUTING_SOURCES = ("model", "trace", "profile")
EXPERT_PRECISIONS = ("dtype", "fp8")  # bench.expert_precision: whatif/expert_precision.py
DEFAULT_POLICIES = ({"name": "natural"}, {"name": "greedy_balanced"}, {"name": "round_robin_balanced"})
DEFAULT_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class BenchOptions:
    #: engine: the real launcher, scheduler and model runner, policies switched in place and
    #: interleaved (experiment.py). static: the kernel-level loop beside transformers (measure.py).
    mode: str = "engine"
    batch: int = 128  # B requests (static: split evenly over EP ranks)
    input_len: int = 64  # L prompt tokens per request (lightllm: the centre of the lengths)
    output_len: int = 64  # O generated tokens per request (1 from prefill, O-1 decode steps)
    small_batch: int = 8  # also time decode at this batch (0: skip)
    repeats: int = 5  # timed repetitions (engine: of every policy, interleaved); the median is reported
    warmup: int = 1  # untimed repetitions first (compiles kernels, captures graphs, fills caches)
    # ---- engine mode ----
    workload: str = "fixed"  # fixed | lightllm (request_sets.py)
    length_spread: float = 0.5  # lightllm: prompt lengths uniform in L*(1 -+ spread)
    policies: tuple = DEFAULT_POLICIES  # compared policies: names or {name: ..., params}; natural is the baseline
    prefill_runs: int = 7  # prefill-only runs of the main set per policy and round, beside the full run
    sweep: tuple = DEFAULT_SWEEP  # per-rank decode batches of the sweep ([]: none)
    sweep_output_len: int = 16  # new tokens per request at each sweep point
    sweep_repeats: int = 3  # timed repetitions of the sweep (interleaved like the phases)
    probe: bool = True  # one eager pass per policy: per-step loads and MoE times (the bound, balancedness)
    served: bool = False  # also run the workload through gRPC (a server subprocess, N client processes)
    served_clients: int = 4  # client processes driving the served run
    # ---- static mode ----
    cuda_graphs: bool = True  # decode through CUDA graphs where they apply (CUDA, a graph-safe dispatcher)
    sync_every_step: bool = True  # bring each step's tokens to the host, as a server must
    moe_timing_steps: int = 4  # eager decode steps timed with events around each MoE block
    policy_cost_repeats: int = 50
    hf_baseline: bool = True  # time transformers on the same weights (ep_size 1 only)
    hf_cache: str = "static"  # static | dynamic (transformers' KV cache for generate)
    hf_compile: bool = False  # let transformers torch.compile its decode step (slow to start)
    hf_experts: str | None = None  # transformers' experts_implementation (None: its default)
    # ---- whatif mode (server/bench/whatif): EP-N from one device ----
    routing_source: str = "model"  # model | trace | profile: what the router chose (whatif/sources.py)
    routing_model: str = "same"  # source=model: same (the simulated model) | tiny | a model folder
    routing_trace: str | None = None  # source=trace: a routing=record file (None: the tiny model's held-out trace)
    routing_pool: int = 512  # source=model: requests recorded at most (larger sets reuse them)
    profile: str | None = None  # source=profile: conf/routing_profile/<name>.yaml, or a path
    interconnect: str = "ib400_h100"  # conf/interconnect/<name>.yaml, or a path (calibrate_interconnect.py)
    eplb_redundant_per_rank: tuple = (0, 1)  # EPLB variants beside the policies (natural + placement), R = this x ep
    whatif_decode_steps: int = 8  # decode steps timed per request set, evenly spread (0: all)
    whatif_reps: int = 10  # graph replays per timed expert-kernel shape (median)
    whatif_validate: bool = False  # ep_size 1: then run the real engine on the same sets and compare step times
    expert_precision: str = "dtype"  # dtype (model.dtype) | fp8 (e4m3, 128x128 block scales, the FP8 expert path)
    # ---- all modes ----
    block_size: int = 16
    seed: int = 0  # prompt tokens and lengths
    out_dir: str = "gpu_out/bench"
    tag: str | None = None  # run name; default model-parallel-routing(+params) / model-parallel-workload
    rank_timeout_s: float = 600.0  # a rank that runs longer dumps its stack and exits (no silent hang)

    def validate(self, ep_size: int) -> None:
        for key in ("batch", "input_len", "output_len", "repeats", "block_size", "policy_cost_repeats",
                    "sweep_output_len", "sweep_repeats", "served_clients"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"bench.{key} must be a positive integer, got {value!r}")
        for key in ("small_batch", "warmup", "moe_timing_steps", "prefill_runs"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"bench.{key} must be an integer >= 0, got {value!r}")
        if self.mode not in MODES:
            raise ConfigError(f"bench.mode={self.mode!r} is not one of {MODES}")
        if self.mode != "whatif" and self.batch % ep_size:  # the what-if deals sets as the scheduler does
            raise ConfigError(f"bench.batch={self.batch} must divide evenly over parallel.ep_size={ep_size} ranks")
        if self.mode != "whatif" and self.small_batch % ep_size:
            raise ConfigError(f"bench.small_batch={self.small_batch} must divide evenly over parallel.ep_size={ep_size} ranks")
        for key in ("routing_pool", "whatif_reps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"bench.{key} must be a positive integer, got {value!r}")
        if not isinstance(self.whatif_decode_steps, int) or self.whatif_decode_steps < 0:
            raise ConfigError(f"bench.whatif_decode_steps must be an integer >= 0 (0: all), got {self.whatif_decode_steps!r}")
        if self.expert_precision not in EXPERT_PRECISIONS:
            raise ConfigError(f"bench.expert_precision={self.expert_precision!r} is not one of {EXPERT_PRECISIONS}")
        if self.expert_precision != "dtype" and self.mode != "whatif":
            raise ConfigError(f"bench.expert_precision={self.expert_precision} is read by bench.mode=whatif only "
                              f"(bench.mode={self.mode} runs the model's own expert weights)")
        if self.routing_source not in ROUTING_SOURCES:
            raise ConfigError(f"bench.routing_source={self.routing_source!r} is not one of {ROUTING_SOURCES}")
        if self.whatif_validate:
            self._check_validation(ep_size)
        if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in self.eplb_redundant_per_rank):
            raise ConfigError(f"bench.eplb_redundant_per_rank must list integers >= 0, got {list(self.eplb_redundant_per_rank)}")
        if self.hf_cache not in HF_CACHES:
            raise ConfigError(f"bench.hf_cache={self.hf_cache!r} is not one of {HF_CACHES}")
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"bench.block_size must be a power of two, got {self.block_size}")
        if self.output_len < 2 or self.sweep_output_len < 2:
            raise ConfigError(f"bench.output_len and bench.sweep_output_len must be >= 2 (one prefill token, then "
                              f"decode steps), got {self.output_len} and {self.sweep_output_len}")
        if not 0 <= self.length_spread < 1:
            raise ConfigError(f"bench.length_spread must be in [0, 1), got {self.length_spread}")
        if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.sweep):
            raise ConfigError(f"bench.sweep must list positive per-rank batch sizes, got {list(self.sweep)}")
        names = [p["name"] for p in self.policies]
        if "natural" not in names:
            raise ConfigError(f"bench.policies must include natural (every ratio is to natural), got {names}")
        if len({json.dumps(p, sort_keys=True) for p in self.policies}) != len(self.policies):
            raise ConfigError(f"bench.policies lists a policy twice: {names}")

    def _check_validation(self, ep_size: int) -> None:
        """bench.whatif_validate compares the what-if with the real engine at one rank, which
        routes the set's prompts with the model's own router: the what-if must route the same."""
        if self.mode != "whatif" or ep_size != 1:
            raise ConfigError(f"bench.whatif_validate runs the real engine beside the what-if at parallel.ep_size=1 in "
                              f"bench.mode=whatif (got mode {self.mode}, ep_size {ep_size})")
        if self.routing_source != "model" or not self.routes_with_simulated_model:
            raise ConfigError(f"bench.whatif_validate needs bench.routing_source=model with bench.routing_model=same "
                              f"(got {self.routing_source}, {self.routing_model}): the engine it is checked against "
                              "routes the set's prompts with the model's own router")

    @property
    def routes_with_simulated_model(self) -> bool:
        """bench.routing_model names the simulated model itself (same, or left empty)."""
        return self.routing_model in (None, "", "same")

    @property
    def policy_labels(self) -> list[str]:
        """One short name per compared policy: its name, plus the parameters it sets."""
        return [p["name"] + "".join(f"-{k}{v}" for k, v in sorted(p.items()) if k != "name") for p in self.policies]


def _policy_list(raw: Any) -> tuple[dict[str, Any], ...]:
    """bench.policies entries (a registered name, or a mapping with `name`) -> routing mappings."""
    if isinstance(raw, (str, Mapping)):
        raw = [raw]
    out = []
    for entry in raw or ():
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"bench.policies entries must be policy names or mappings with a name, got {entry!r}")
        out.append(dict(entry))
    return tuple(out)


@dataclass(frozen=True)
class BenchSettings:
    model: ModelConfig
    routing: RoutingConfig
    parallel: ParallelConfig
    bench: BenchOptions
    command: str = ""  # how this run was started (goes into the JSON)
    #: Hydra overrides that select this run's model and parallel settings, for starting
    #: `python -m server` with the same ones (bench.served)
    server_overrides: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], command: str = "", server_overrides: tuple[str, ...] = ()) -> "BenchSettings":
        data = dict(data)
        unknown = sorted(set(data) - {"model", "routing", "parallel", "bench"})
        if unknown:
            raise ConfigError(f"unknown top-level key(s) {unknown}; the benchmark reads model, routing, parallel, bench")
        app = AppConfig.from_dict({k: data[k] for k in ("model", "routing", "parallel") if k in data})
        raw = dict(data.get("bench") or {})
        known = {f.name for f in fields(BenchOptions)}
        bad = sorted(set(raw) - known)
        if bad:
            raise ConfigError(f"unknown key(s) {', '.join('bench.' + k for k in bad)}; known: {sorted(known)}")
        if "policies" in raw:
            raw["policies"] = _policy_list(raw["policies"])
        for key in ("sweep", "eplb_redundant_per_rank"):
            if key in raw:
                raw[key] = tuple(raw[key] or ())
        bench = BenchOptions(**raw)
        bench.validate(app.parallel.ep_size)
        return cls(model=app.model, routing=app.routing, parallel=app.parallel, bench=bench, command=command,
                   server_overrides=tuple(server_overrides))

    def to_dict(self) -> dict[str, Any]:
        """Plain, picklable data that from_dict accepts (frozen mappings are not picklable)."""
        return {
            "model": {f.name: thaw(getattr(self.model, f.name)) for f in fields(self.model)},
            "routing": {"name": self.routing.name, **thaw(self.routing.params)},
            "parallel": {f.name: thaw(getattr(self.parallel, f.name)) for f in fields(self.parallel)},
            "bench": asdict(self.bench),
        }

    @property
    def ep_size(self) -> int:
        return self.parallel.ep_size

    def tag(self) -> str:
        if self.bench.tag:
            return self.bench.tag
        par = "single" if self.ep_size == 1 else f"ep{self.ep_size}"
        if self.parallel.eplb_enabled:  # EPLB runs must not overwrite the plain run of the same policy
            par += f"-eplb{self.parallel.redundant_experts}"
        if self.model.quantization == "fp8":  # nor random FP8 weights the same shape's bf16 run
            par += "-fp8"
        if self.bench.mode == "engine":  # every policy in one run: named by its workload
            return f"{self.model.name}-{par}-{self.bench.workload}".replace("/", "_")
        if self.bench.mode == "whatif":
            source = self.bench.profile if self.bench.routing_source == "profile" else self.bench.routing_source
            return f"{self.model.name}-{par}-{self.bench.workload}-{source}".replace("/", "_")
        defaults = _policy_defaults(self.routing.name)
        params = "".join(f"-{k}{v}" for k, v in sorted(self.routing.params.items())
                         if k not in defaults or defaults[k] != v)  # only what differs from the policy's defaults
        return f"{self.model.name}-{par}-{self.routing.name}{params}".replace("/", "_")


def _policy_defaults(name: str) -> dict[str, Any]:
    """Keyword defaults of a registered policy's constructor (empty if the name is unknown)."""
    import inspect

    from ..moe.routing import UnknownPolicyError, get_policy_class

    try:
        cls = get_policy_class(name)
    except UnknownPolicyError:
        return {}
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None:
            out.update({p.name: p.default for p in inspect.signature(init).parameters.values()
                        if p.default is not inspect.Parameter.empty})
    return out
