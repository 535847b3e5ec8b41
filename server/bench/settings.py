"""BenchSettings: the benchmark's own knobs (`bench.*`) plus the server's model/routing/parallel
sections, validated once below the Hydra entry point and passed to rank processes as is."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ..config import AppConfig, ConfigError, ModelConfig, ParallelConfig, RoutingConfig, thaw

HF_CACHES = ("static", "dynamic")


@dataclass(frozen=True)
class BenchOptions:
    batch: int = 128  # B sequences in the static workload (split evenly over EP ranks)
    input_len: int = 64  # L prompt tokens per sequence
    output_len: int = 64  # O generated tokens per sequence (1 from prefill, O-1 decode steps)
    small_batch: int = 8  # also time decode at this batch (0: skip)
    repeats: int = 3  # timed generations; the median is reported
    warmup: int = 1  # untimed generations first (compiles kernels, fills caches)
    cuda_graphs: bool = True  # decode through CUDA graphs where they apply (ep_size 1, CUDA)
    sync_every_step: bool = True  # bring each step's tokens to the host, as a server must
    moe_timing_steps: int = 4  # eager decode steps timed with events around each MoE block
    policy_cost_repeats: int = 50
    hf_baseline: bool = True  # time transformers on the same weights (ep_size 1 only)
    hf_cache: str = "static"  # static | dynamic (transformers' KV cache for generate)
    hf_compile: bool = False  # let transformers torch.compile its decode step (slow to start)
    block_size: int = 16
    seed: int = 0  # prompt tokens
    out_dir: str = "gpu_out/bench"
    tag: str | None = None  # run name; default model-parallel-routing(+params)
    rank_timeout_s: float = 600.0  # a rank that runs longer dumps its stack and exits (no silent hang)

    def validate(self, ep_size: int) -> None:
        for key in ("batch", "input_len", "output_len", "repeats", "block_size", "policy_cost_repeats"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"bench.{key} must be a positive integer, got {value!r}")
        for key in ("small_batch", "warmup", "moe_timing_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"bench.{key} must be an integer >= 0, got {value!r}")
        if self.batch % ep_size:
            raise ConfigError(f"bench.batch={self.batch} must divide evenly over parallel.ep_size={ep_size} ranks")
        if self.small_batch % ep_size:
            raise ConfigError(f"bench.small_batch={self.small_batch} must divide evenly over parallel.ep_size={ep_size} ranks")
        if self.hf_cache not in HF_CACHES:
            raise ConfigError(f"bench.hf_cache={self.hf_cache!r} is not one of {HF_CACHES}")
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"bench.block_size must be a power of two, got {self.block_size}")
        if self.output_len < 2:
            raise ConfigError(f"bench.output_len must be >= 2 (one prefill token, then decode steps), got {self.output_len}")


@dataclass(frozen=True)
class BenchSettings:
    model: ModelConfig
    routing: RoutingConfig
    parallel: ParallelConfig
    bench: BenchOptions
    command: str = ""  # how this run was started (goes into the JSON)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], command: str = "") -> "BenchSettings":
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
        bench = BenchOptions(**raw)
        bench.validate(app.parallel.ep_size)
        return cls(model=app.model, routing=app.routing, parallel=app.parallel, bench=bench, command=command)

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
        defaults = _policy_defaults(self.routing.name)
        params = "".join(f"-{k}{v}" for k, v in sorted(self.routing.params.items())
                         if k not in defaults or defaults[k] != v)  # only what differs from the policy's defaults
        par = "single" if self.ep_size == 1 else f"ep{self.ep_size}"
        if self.parallel.eplb_enabled:  # EPLB runs must not overwrite the plain run of the same policy
            par += f"-eplb{self.parallel.redundant_experts}"
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
