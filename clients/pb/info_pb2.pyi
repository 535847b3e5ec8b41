from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_STATE_UNSPECIFIED: _ClassVar[ServingState]
    SERVING_STATE_LOADING: _ClassVar[ServingState]
    SERVING_STATE_SERVING: _ClassVar[ServingState]
    SERVING_STATE_DRAINING: _ClassVar[ServingState]
    SERVING_STATE_FAILED: _ClassVar[ServingState]
SERVING_STATE_UNSPECIFIED: ServingState
SERVING_STATE_LOADING: ServingState
SERVING_STATE_SERVING: ServingState
SERVING_STATE_DRAINING: ServingState
SERVING_STATE_FAILED: ServingState

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoutingPolicyInfo(_message.Message):
    __slots__ = ("name", "params", "guarantee", "counters_reset_unix_s", "since_engine_step")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    GUARANTEE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_RESET_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SINCE_ENGINE_STEP_FIELD_NUMBER: _ClassVar[int]
    name: str
    params: _struct_pb2.Struct
    guarantee: str
    counters_reset_unix_s: float
    since_engine_step: int
    def __init__(self, name: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., guarantee: _Optional[str] = ..., counters_reset_unix_s: _Optional[float] = ..., since_engine_step: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "architecture", "num_layers", "num_moe_layers", "num_experts", "top_k", "hidden_size", "vocab_size", "max_model_len", "dtype", "device", "ep_size", "routing", "eos_token_ids")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    architecture: str
    num_layers: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    dtype: str
    device: str
    ep_size: int
    routing: RoutingPolicyInfo
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_name: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_moe_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., top_k: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., ep_size: _Optional[int] = ..., routing: _Optional[_Union[RoutingPolicyInfo, _Mapping]] = ..., eos_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetExpertLoadRequest(_message.Message):
    __slots__ = ("reset",)
    RESET_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    def __init__(self, reset: _Optional[bool] = ...) -> None: ...

class LayerExpertLoad(_message.Message):
    __slots__ = ("layer", "expert_tokens", "rank_tokens", "tokens", "expert_max_over_mean", "rank_max_over_mean", "mean_ranks_per_token", "rank_active_experts", "rank_balancedness", "expert_balancedness")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RANK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_MAX_OVER_MEAN_FIELD_NUMBER: _ClassVar[int]
    RANK_MAX_OVER_MEAN_FIELD_NUMBER: _ClassVar[int]
    MEAN_RANKS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RANK_ACTIVE_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    RANK_BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert_tokens: _containers.RepeatedScalarFieldContainer[int]
    rank_tokens: _containers.RepeatedScalarFieldContainer[int]
    tokens: int
    expert_max_over_mean: float
    rank_max_over_mean: float
    mean_ranks_per_token: float
    rank_active_experts: _containers.RepeatedScalarFieldContainer[int]
    rank_balancedness: float
    expert_balancedness: float
    def __init__(self, layer: _Optional[int] = ..., expert_tokens: _Optional[_Iterable[int]] = ..., rank_tokens: _Optional[_Iterable[int]] = ..., tokens: _Optional[int] = ..., expert_max_over_mean: _Optional[float] = ..., rank_max_over_mean: _Optional[float] = ..., mean_ranks_per_token: _Optional[float] = ..., rank_active_experts: _Optional[_Iterable[int]] = ..., rank_balancedness: _Optional[float] = ..., expert_balancedness: _Optional[float] = ...) -> None: ...

class Balancedness(_message.Message):
    __slots__ = ("min", "p50", "p90", "avg")
    MIN_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P90_FIELD_NUMBER: _ClassVar[int]
    AVG_FIELD_NUMBER: _ClassVar[int]
    min: float
    p50: float
    p90: float
    avg: float
    def __init__(self, min: _Optional[float] = ..., p50: _Optional[float] = ..., p90: _Optional[float] = ..., avg: _Optional[float] = ...) -> None: ...

class ExpertLoadSummary(_message.Message):
    __slots__ = ("expert_max_over_mean", "rank_max_over_mean", "mean_ranks_per_token", "tokens_per_layer", "rank_balancedness", "expert_balancedness")
    EXPERT_MAX_OVER_MEAN_FIELD_NUMBER: _ClassVar[int]
    RANK_MAX_OVER_MEAN_FIELD_NUMBER: _ClassVar[int]
    MEAN_RANKS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    RANK_BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    expert_max_over_mean: float
    rank_max_over_mean: float
    mean_ranks_per_token: float
    tokens_per_layer: float
    rank_balancedness: Balancedness
    expert_balancedness: Balancedness
    def __init__(self, expert_max_over_mean: _Optional[float] = ..., rank_max_over_mean: _Optional[float] = ..., mean_ranks_per_token: _Optional[float] = ..., tokens_per_layer: _Optional[float] = ..., rank_balancedness: _Optional[_Union[Balancedness, _Mapping]] = ..., expert_balancedness: _Optional[_Union[Balancedness, _Mapping]] = ...) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("num_layers", "num_experts", "ep_size", "layers", "rank_totals", "summary", "seconds_since_reset", "reset", "engine_step")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    RANK_TOTALS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_RESET_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    ENGINE_STEP_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_experts: int
    ep_size: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerExpertLoad]
    rank_totals: _containers.RepeatedScalarFieldContainer[int]
    summary: ExpertLoadSummary
    seconds_since_reset: float
    reset: bool
    engine_step: int
    def __init__(self, num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., ep_size: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerExpertLoad, _Mapping]]] = ..., rank_totals: _Optional[_Iterable[int]] = ..., summary: _Optional[_Union[ExpertLoadSummary, _Mapping]] = ..., seconds_since_reset: _Optional[float] = ..., reset: _Optional[bool] = ..., engine_step: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerConfigSummary(_message.Message):
    __slots__ = ("address", "tls", "auth", "metrics_port", "max_concurrent_streams", "max_message_bytes", "grace_period_s", "max_num_seqs", "max_queue", "kv_cache_tokens", "routing_policy", "ep_size", "model_name")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_S_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    address: str
    tls: bool
    auth: bool
    metrics_port: int
    max_concurrent_streams: int
    max_message_bytes: int
    grace_period_s: float
    max_num_seqs: int
    max_queue: int
    kv_cache_tokens: int
    routing_policy: str
    ep_size: int
    model_name: str
    def __init__(self, address: _Optional[str] = ..., tls: _Optional[bool] = ..., auth: _Optional[bool] = ..., metrics_port: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., grace_period_s: _Optional[float] = ..., max_num_seqs: _Optional[int] = ..., max_queue: _Optional[int] = ..., kv_cache_tokens: _Optional[int] = ..., routing_policy: _Optional[str] = ..., ep_size: _Optional[int] = ..., model_name: _Optional[str] = ...) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("active_calls", "running_sequences", "waiting_sequences", "kv_blocks_used", "kv_blocks_total", "engine_steps", "requests_by_code", "prompt_tokens", "completion_tokens")
    class RequestsByCodeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ACTIVE_CALLS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WAITING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_STEPS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_CODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    active_calls: int
    running_sequences: int
    waiting_sequences: int
    kv_blocks_used: int
    kv_blocks_total: int
    engine_steps: int
    requests_by_code: _containers.ScalarMap[str, int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, active_calls: _Optional[int] = ..., running_sequences: _Optional[int] = ..., waiting_sequences: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., engine_steps: _Optional[int] = ..., requests_by_code: _Optional[_Mapping[str, int]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "uptime_s", "state", "config", "stats")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_s: float
    state: ServingState
    config: ServerConfigSummary
    stats: ServerStats
    def __init__(self, version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., state: _Optional[_Union[ServingState, str]] = ..., config: _Optional[_Union[ServerConfigSummary, _Mapping]] = ..., stats: _Optional[_Union[ServerStats, _Mapping]] = ...) -> None: ...
