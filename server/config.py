"""Frozen, validated configuration below the Hydra entry point.

Hydra composes `conf/`; `AppConfig.from_dict` turns the resolved tree into plain frozen
dataclasses once, at start-up, and every impossible setting raises ConfigError naming the
key(s). Worker processes receive these objects, never Hydra state.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("auto", "none", "dequantize", "fp8")  # model.quantization: server/model/quantization.py


class ConfigError(ValueError):
    """An impossible or malformed setting; the message names the key(s)."""


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Frozen mapping/tuple tree -> plain dict/list (for JSON, kwargs, HF configs)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def _build(cls: type, section: str, data: Mapping[str, Any] | None) -> Any:
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; known: {sorted(known)}")
    return cls(**{k: _freeze(v) for k, v in data.items()})


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP literals only: a DNS name such as 127.example.com
    may resolve anywhere, so it counts as remote."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to serve. `path` null means the embedded `tiny` model, or a random-weight
    model built from `shape` (a config.json-style mapping) for benchmarks at real sizes."""

    name: str = "tiny"
    path: str | None = None
    shape: Mapping[str, Any] | None = None
    dtype: str = "auto"
    max_model_len: int = 2048
    seed: int = 0
    quantization: str = "auto"  # FP8 block-quantised checkpoints: auto (config.json's) | none (refuse) | dequantize | fp8 (model.shape: random FP8 weights)

    def validate(self) -> None:
        _require(self.dtype in DTYPES, f"model.dtype={self.dtype!r} is not one of {DTYPES}")
        _require(self.quantization in QUANTIZATIONS, f"model.quantization={self.quantization!r} is not one of {QUANTIZATIONS}")
        _require(isinstance(self.max_model_len, int) and self.max_model_len > 0,
                 f"model.max_model_len must be a positive integer, got {self.max_model_len!r}")
        _require(not (self.path and self.shape), "model.path and model.shape are exclusive: a checkpoint has its own shape")
        _require(self.quantization != "fp8" or (self.shape and not self.path),
                 "model.quantization=fp8 draws random FP8 block weights for a model.shape; a checkpoint says its own "
                 "format (model.quantization=auto serves an FP8 checkpoint as shipped)")


@dataclass(frozen=True)
class RoutingConfig:
    """`name` picks a registered policy; every other key is a parameter of that policy."""

    name: str = "natural"
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "RoutingConfig":
        data = dict(data or {})
        name = data.pop("name", "natural")
        _require(isinstance(name, str) and name, "routing.name must be a non-empty string")
        return cls(name=name, params=_freeze(data))


@dataclass(frozen=True)
class ParallelConfig:
    ep_size: int = 1
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    device: str = "auto"  # auto: cuda when available
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: pick a free port when spawning ranks ourselves
    # EPLB (server/moe/eplb): output-preserving balance by replicating hot experts.
    redundant_experts: int = 0  # extra physical expert slots per MoE layer, spread evenly over the ranks
    eplb_stats: str | None = None  # JSON expert-load file: place experts from it at start-up
    eplb_interval: int = 0  # rebalance from the live counters every N engine steps (0: never)
    eplb_policy: str = "auto"  # auto | global | hierarchical (auto: hierarchical when nodes divide groups)
    eplb_num_groups: int = 0  # expert groups for the hierarchical policy (0: the model's, 1 if it has none)
    eplb_num_nodes: int = 0  # nodes the ranks span (0: from torchrun's LOCAL_WORLD_SIZE, else 1)
    # EP dispatch (server/moe/dispatch): auto | local | allgather | alltoall. allgather at
    # ep_size 1 forces the fixed-capacity EP path over a size-1 process group (measurement).
    dispatch: str = "auto"
    dispatch_fixed_max_rows: int = 0  # auto: steps up to this many rows per rank take the fixed-capacity
    # path, larger ones the variable splits (0: every step the scheduler can plan)
    dispatch_wire: str = "bf16"  # bf16 | fp8: hidden rows on the fixed-capacity path's all-gather
    # (fp8: e4m3 codes and a float32 scale per 128 channels, about half the bytes)

    @property
    def eplb_enabled(self) -> bool:
        """Any EPLB key set: experts are placed by the replica map instead of in blocks."""
        return bool(self.redundant_experts or self.eplb_stats or self.eplb_interval)

    def validate(self) -> None:
        _require(isinstance(self.ep_size, int) and self.ep_size >= 1, f"parallel.ep_size must be an integer >= 1, got {self.ep_size!r}")
        _require(self.backend in BACKENDS, f"parallel.backend={self.backend!r} is not one of {BACKENDS}")
        _require(self.device in DEVICES, f"parallel.device={self.device!r} is not one of {DEVICES}")
        _require(not (self.backend == "nccl" and self.device == "cpu"), "parallel.backend=nccl needs parallel.device=cuda (or auto)")
        _require(isinstance(self.dispatch, str) and self.dispatch != "",
                 f"parallel.dispatch must name a dispatcher (auto, local, allgather, alltoall), got {self.dispatch!r}")
        wires = ("bf16", "fp8")  # server/moe/dispatch/wire.py WIRES
        _require(self.dispatch_wire in wires, f"parallel.dispatch_wire={self.dispatch_wire!r} is not one of {wires}")
        for key in ("redundant_experts", "eplb_interval", "eplb_num_groups", "eplb_num_nodes", "dispatch_fixed_max_rows"):
            value = getattr(self, key)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                     f"parallel.{key} must be an integer >= 0, got {value!r}")
        policies = ("auto", "global", "hierarchical")  # server/moe/eplb/algorithm.py POLICIES
        _require(self.eplb_policy in policies, f"parallel.eplb_policy={self.eplb_policy!r} is not one of {policies}")
        _require(self.eplb_stats is None or (isinstance(self.eplb_stats, str) and self.eplb_stats != ""),
                 f"parallel.eplb_stats must be a path to a JSON expert-load file or null, got {self.eplb_stats!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler and KV-cache limits: admission control queues, then refuses, never crashes."""

    max_num_seqs: int = 64  # running sequences per EP rank
    max_num_batched_tokens: int = 4096  # prefill token budget per step per rank
    kv_block_size: int = 16
    kv_cache_tokens: int = 65536  # KV capacity per rank, in tokens (CPU, or gpu_memory_utilization=0)
    gpu_memory_utilization: float = 0.9  # CUDA: the KV cache fills this fraction of device memory (0: kv_cache_tokens)
    max_queue: int = 512  # waiting requests before RESOURCE_EXHAUSTED (>= server.max_concurrent_streams)
    overlap: bool = True  # plan step n+1 and post-process step n while step n runs (false: one step at a time)
    step_timeout_s: float = 30.0  # a step running longer (or 10x the recent p99, if more) means a hung rank; 0: off
    first_step_timeout_s: float = 300.0  # the first steps, and policy switches / EPLB moves, may take this long
    warmup: bool = True  # before serving, run every kernel variant a step can need (CUDA; server/worker/warmup.py)
    slow_step_factor: float = 10.0  # log a step slower than this many times the recent median (0: never)

    def validate(self) -> None:
        for key in ("max_num_seqs", "max_num_batched_tokens", "kv_block_size", "kv_cache_tokens", "max_queue"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value > 0, f"engine.{key} must be a positive integer, got {value!r}")
        _require(isinstance(self.overlap, bool), f"engine.overlap must be true or false, got {self.overlap!r}")
        _require(isinstance(self.warmup, bool), f"engine.warmup must be true or false, got {self.warmup!r}")
        _require(isinstance(self.slow_step_factor, (int, float)) and not isinstance(self.slow_step_factor, bool)
                 and (self.slow_step_factor == 0 or self.slow_step_factor > 1),
                 f"engine.slow_step_factor must be 0 (off) or a number > 1, got {self.slow_step_factor!r}")
        _require(isinstance(self.gpu_memory_utilization, (int, float)) and not isinstance(self.gpu_memory_utilization, bool)
                 and 0 <= self.gpu_memory_utilization <= 1,
                 f"engine.gpu_memory_utilization must be a fraction in [0, 1] (0: size the cache by "
                 f"engine.kv_cache_tokens), got {self.gpu_memory_utilization!r}")
        _require(self.kv_cache_tokens >= self.kv_block_size, "engine.kv_cache_tokens must hold at least one engine.kv_block_size block")
        for key in ("step_timeout_s", "first_step_timeout_s"):
            value = getattr(self, key)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
                     f"engine.{key} must be a number of seconds >= 0, got {value!r}")


@dataclass(frozen=True)
class KernelConfig:
    """Which kernels and decode path the model runs, chosen once when it is built (names are
    checked against the kernel registries when the launch plan is built: server/launch_plan.py).
    Each key has one environment variable that overrides it (KERNEL_ENV), for tools and
    baselines; an override in effect is logged at start-up."""

    backend: str = "auto"  # auto (triton on CUDA when it imports, else torch) | torch | triton | grouped_mm
    expert_path: str = "auto"  # auto: the backend's own; else a name of server/moe/experts.py EXPERT_PATHS
    mla_decode: str = "triton_decode"  # MLA decode on the Triton backend: triton_decode (head-block kernel) |
    #                                    triton (the varlen MLA kernel) | dense (batched matmuls)
    mla_prefill: str = "auto"  # MLA prefill on the Triton backend: absorbed (latent-cache kernel) | expanded
    #                            (decompressed K/V, flash attention) | auto (expanded for long prompts)
    cuda_graphs: bool = True  # decode as CUDA graphs where they apply (false: eager, on every EP rank)

    def validate(self) -> None:
        for key in ("backend", "expert_path", "mla_decode", "mla_prefill"):
            value = getattr(self, key)
            _require(isinstance(value, str) and value != "", f"kernels.{key} must be a name, got {value!r}")
        _require(isinstance(self.cuda_graphs, bool), f"kernels.cuda_graphs must be true or false, got {self.cuda_graphs!r}")


#: kernels.<key> -> the environment variable that overrides it
KERNEL_ENV = {"backend": "EPSERVE_KERNEL_BACKEND", "expert_path": "EPSERVE_EXPERT_PATH",
              "mla_decode": "EPSERVE_MLA_DECODE", "mla_prefill": "EPSERVE_MLA_PREFILL",
              "cuda_graphs": "EPSERVE_CUDA_GRAPHS"}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    allow_remote: bool = False  # binding a non-loopback host needs this explicitly
    max_concurrent_streams: int = 512
    max_message_bytes: int = 4 * 1024 * 1024
    grace_period_s: float = 10.0
    auth_token: str | None = None  # bearer token; null disables auth
    auth_token_env: str | None = None  # or read it from this environment variable
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: int = 0  # 0 disables the Prometheus endpoint
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    stream_interval: int = 1  # tokens per stream message (the first and the last go out at once)
    log_interval_s: float = 10.0  # while busy, one log line this often (throughput, queue, KV, balance); 0: off
    engine_process: bool = True  # run the engine core in its own process (false: a thread of this one)
    max_calls_per_connection: int = 256  # generation calls one client connection may hold at once
    stalled_stream_timeout_s: float = 60.0  # a stream whose client read nothing this long is cancelled
    max_prompt_bytes: int = 1048576  # text prompts longer than this are refused before tokenizing
    allow_routing_switch: bool = False  # SetRoutingPolicy may switch the routing policy of the running server
    http_port: int = 0  # the OpenAI-compatible HTTP front end's port; 0 turns it off
    http_host: str = "127.0.0.1"  # its address (beyond loopback only with allow_remote)

    def validate(self) -> None:
        _require(isinstance(self.port, int) and 0 <= self.port < 65536, f"server.port must be in [0, 65535], got {self.port!r}")
        _require(isinstance(self.metrics_port, int) and 0 <= self.metrics_port < 65536, f"server.metrics_port must be in [0, 65535], got {self.metrics_port!r}")
        _require(bool(self.tls_cert) == bool(self.tls_key), "server.tls_cert and server.tls_key must be set together")
        _require(self.max_message_bytes >= 1024, "server.max_message_bytes must be at least 1024")
        _require(self.grace_period_s >= 0, "server.grace_period_s must be >= 0")
        _require(isinstance(self.max_calls_per_connection, int) and self.max_calls_per_connection >= 1,
                 f"server.max_calls_per_connection must be an integer >= 1, got {self.max_calls_per_connection!r}")
        _require(self.stalled_stream_timeout_s > 0, "server.stalled_stream_timeout_s must be > 0")
        _require(isinstance(self.allow_routing_switch, bool),
                 f"server.allow_routing_switch must be true or false, got {self.allow_routing_switch!r}")
        _require(isinstance(self.max_prompt_bytes, int) and self.max_prompt_bytes >= 1,
                 f"server.max_prompt_bytes must be an integer >= 1, got {self.max_prompt_bytes!r}")
        _require(isinstance(self.log_interval_s, (int, float)) and not isinstance(self.log_interval_s, bool)
                 and self.log_interval_s >= 0, f"server.log_interval_s must be seconds >= 0 (0: off), got {self.log_interval_s!r}")
        _require(isinstance(self.stream_interval, int) and not isinstance(self.stream_interval, bool)
                 and self.stream_interval >= 1, f"server.stream_interval must be an integer >= 1, got {self.stream_interval!r}")
        _require(isinstance(self.http_port, int) and not isinstance(self.http_port, bool) and 0 <= self.http_port < 65536,
                 f"server.http_port must be in [0, 65535] (0: no HTTP front end), got {self.http_port!r}")
        _require(not self.http_port or is_loopback(self.http_host) or self.allow_remote,
                 f"server.http_host={self.http_host!r} is not a loopback address; set server.allow_remote=true "
                 "to serve HTTP beyond this machine")
        _require(is_loopback(self.host) or self.allow_remote,
                 f"server.host={self.host!r} is not a loopback address; set server.allow_remote=true to serve beyond this machine")


def app_to_dict(app: "AppConfig") -> dict[str, Any]:
    """AppConfig -> the plain dict AppConfig.from_dict accepts (picklable: frozen mappings are not)."""
    out: dict[str, Any] = {}
    for f in fields(app):
        value = getattr(app, f.name)
        if isinstance(value, RoutingConfig):
            out[f.name] = {"name": value.name, **thaw(value.params)}
        elif hasattr(value, "__dataclass_fields__"):
            out[f.name] = {g.name: thaw(getattr(value, g.name)) for g in fields(value)}
        else:
            out[f.name] = thaw(value)
    return out


@dataclass(frozen=True)
class AppConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    dry_run: bool = False  # validate everything against the model's shape, print the plan, exit

    def __reduce__(self):
        """Pickled as its plain dict (spawned processes, the launch plan shipped to ranks)."""
        return AppConfig.from_dict, (app_to_dict(self),)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AppConfig":
        """Plain dict (e.g. OmegaConf.to_container(cfg, resolve=True)) -> validated AppConfig."""
        data = dict(data)
        sections = {"model", "routing", "parallel", "engine", "kernels", "server", "dry_run"}
        unknown = sorted(set(data) - sections)
        if unknown:
            raise ConfigError(f"unknown top-level config key(s) {unknown}; known: {sorted(sections)}")
        cfg = cls(
            model=_build(ModelConfig, "model", data.get("model")),
            routing=RoutingConfig.from_dict(data.get("routing")),
            parallel=_build(ParallelConfig, "parallel", data.get("parallel")),
            engine=_build(EngineConfig, "engine", data.get("engine")),
            kernels=_build(KernelConfig, "kernels", data.get("kernels")),
            server=_build(ServerConfig, "server", data.get("server")),
            dry_run=bool(data.get("dry_run", False)),
        )
        for section in (cfg.model, cfg.parallel, cfg.engine, cfg.kernels, cfg.server):
            section.validate()
        _require(is_loopback(cfg.parallel.master_addr) or cfg.server.allow_remote,
                 f"parallel.master_addr={cfg.parallel.master_addr!r} is not a loopback address: the EP ranks' "
                 "rendezvous store (torch's TCPStore) and their gloo/NCCL sockets would listen on it, and the store "
                 "has no authentication; set server.allow_remote=true to accept that (ranks on other machines)")
        return cfg
