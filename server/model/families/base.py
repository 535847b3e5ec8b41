"""What distinguishes one MoE family from another, and the shared config.json parser.

A family class holds the HF config-class defaults of its `model_type` (so a config.json that
omits a key means what transformers would make of it), the names its checkpoints use, and a
few rules: which layers are MoE, which attention flavour, how the router turns logits into
top-k weights. The model code reads only the ModelSpec this produces.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

from ...layers.activation import ACTIVATIONS, unsupported_activation
from ...layers.rotary_embedding import ROPE_TYPES, YarnScaling
from ..quantization import quantization_scheme
from ..spec import ModelLoadError, ModelSpec

SERVING_DTYPES = ("float32", "bfloat16", "float16")
_UNSET = object()


class ConfigReader:
    """config.json access with the family's defaults and errors that name the key."""

    def __init__(self, cfg: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> None:
        self.cfg, self.defaults, self.source = cfg, defaults, source

    def get(self, key: str, default: Any = _UNSET) -> Any:
        if key in self.cfg:
            return self.cfg[key]
        if key in self.defaults:
            return self.defaults[key]
        if default is _UNSET:
            raise ModelLoadError(f"{self.source}: required key {key!r} is missing")
        return default

    def first(self, *keys: str) -> Any:
        """The first of several alias keys present in config.json, else the first default among them."""
        for key in keys:
            if key in self.cfg and self.cfg[key] is not None:
                return self.cfg[key]
        for key in keys:
            if key in self.defaults:
                return self.defaults[key]
        raise ModelLoadError(f"{self.source}: required key {' / '.join(map(repr, keys))} is missing")

    def positive_int(self, *keys: str) -> int:
        value = self.first(*keys)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelLoadError(f"{self.source}: {keys[0]} must be a positive integer, got {value!r}")
        return value


class MoEFamily:
    """Base class; subclasses register with @register_family in registry.py."""

    model_type: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    default_rope_theta: ClassVar[float] = 10000.0
    qk_norm: ClassVar[str] = "none"
    #: checkpoint module name of the MoE block, preferred first (Mixtral: block_sparse_moe, or mlp when fused)
    moe_module_names: ClassVar[tuple[str, ...]] = ("mlp",)
    #: per-expert checkpoint projection names: (gate, up, down)
    expert_proj_names: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    #: router weights stay float32 after the softmax (Mixtral) instead of the logits' dtype
    router_float32_weights: ClassVar[bool] = False

    # ---- family rules (override where a family differs) ----
    def num_experts(self, c: ConfigReader) -> int:
        return c.positive_int("num_experts", "num_local_experts")

    def moe_intermediate_size(self, c: ConfigReader) -> int:
        return c.positive_int("moe_intermediate_size")

    def moe_layer_indices(self, c: ConfigReader, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers))

    def sliding_windows(self, c: ConfigReader, num_layers: int) -> tuple[int | None, ...]:
        return (None,) * num_layers

    def norm_topk_prob(self, c: ConfigReader) -> bool:
        return bool(c.get("norm_topk_prob"))

    def shared_expert_intermediate_size(self, c: ConfigReader) -> int:
        return 0

    def qkv_bias(self, c: ConfigReader) -> bool:
        return bool(c.get("attention_bias", False))

    def o_bias(self, c: ConfigReader) -> bool:
        return bool(c.get("attention_bias", False))

    def clip_qkv(self, c: ConfigReader) -> float | None:
        return None

    def head_dim(self, c: ConfigReader, hidden: int, heads: int) -> int:
        value = c.cfg.get("head_dim")
        return int(value) if value else hidden // heads

    def extra_fields(self, c: ConfigReader, spec: dict[str, Any]) -> dict[str, Any]:
        """Family-specific ModelSpec fields (router rule, MLA shape, ...), given the shared ones."""
        return {}

    # ---- shared parser ----
    def parse(self, cfg: Mapping[str, Any], *, architecture: str, dtype: str, source: str,
              extra_eos: tuple[int, ...] = (), quantization: str = "auto") -> ModelSpec:
        """config.json dict -> ModelSpec. `dtype` is the serving dtype ("auto": the config's);
        `quantization` is model.quantization (server/model/quantization.py)."""
        c = ConfigReader(cfg, self.defaults, source)
        scheme = quantization_scheme(cfg, quantization, source)
        hidden = c.positive_int("hidden_size")
        heads = c.positive_int("num_attention_heads")
        kv_heads = c.cfg.get("num_key_value_heads", self.defaults.get("num_key_value_heads"))
        kv_heads = heads if kv_heads is None else kv_heads
        if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
            raise ModelLoadError(f"{source}: num_key_value_heads={kv_heads!r} must be a positive divisor of num_attention_heads={heads}")
        num_layers = c.positive_int("num_hidden_layers")
        num_experts = self.num_experts(c)
        top_k = c.positive_int("num_experts_per_tok")
        if top_k > num_experts:
            raise ModelLoadError(f"{source}: num_experts_per_tok={top_k} exceeds the number of experts ({num_experts})")
        rope_type, rope_theta, rope_factor, yarn = self._rope(c, source)
        hidden_act = str(c.get("hidden_act", "silu"))
        if hidden_act not in ACTIVATIONS:
            raise ModelLoadError(f"{source}: {unsupported_activation(hidden_act)}")
        moe_layers = self.moe_layer_indices(c, num_layers)
        if not moe_layers:
            raise ModelLoadError(f"{source}: no decoder layer is an MoE layer (check decoder_sparse_step / mlp_only_layers)")
        fields = dict(
            architecture=architecture,
            model_type=self.model_type,
            num_layers=num_layers,
            moe_layer_indices=moe_layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=self.head_dim(c, hidden, heads),
            vocab_size=c.positive_int("vocab_size"),
            num_experts=num_experts,
            top_k=top_k,
            moe_intermediate_size=self.moe_intermediate_size(c),
            intermediate_size=c.positive_int("intermediate_size"),
            shared_expert_intermediate_size=self.shared_expert_intermediate_size(c),
            norm_topk_prob=self.norm_topk_prob(c),
            max_position_embeddings=c.positive_int("max_position_embeddings"),
            eos_token_ids=_eos_ids(c.get("eos_token_id", None), extra_eos),
            bos_token_id=c.get("bos_token_id", None),
            pad_token_id=c.get("pad_token_id", None),
            dtype=_serving_dtype(dtype, cfg, source),
            rms_norm_eps=float(c.get("rms_norm_eps")),
            hidden_act=hidden_act,
            rope_type=rope_type,
            rope_theta=rope_theta,
            rope_factor=rope_factor,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=self.qkv_bias(c),
            o_bias=self.o_bias(c),
            qk_norm=self.qk_norm,
            clip_qkv=self.clip_qkv(c),
            sliding_windows=self.sliding_windows(c, num_layers),
            initializer_range=float(c.get("initializer_range", 0.02)),
            rope_yarn=yarn,
            quantization=scheme,
        )
        fields.update(self.extra_fields(c, fields))
        return ModelSpec(**fields)

    def rope_parameters(self, c: ConfigReader, source: str) -> Mapping[str, Any]:
        """transformers' priority: rope_scaling > rope_parameters."""
        params = c.cfg.get("rope_scaling") or c.cfg.get("rope_parameters") or {}
        if not isinstance(params, Mapping):
            raise ModelLoadError(f"{source}: rope_parameters must be a mapping, got {params!r}")
        return params

    def rope_type(self, c: ConfigReader, source: str) -> str:
        params = self.rope_parameters(c, source)
        return params.get("rope_type", params.get("type", "default"))

    def _rope(self, c: ConfigReader, source: str) -> tuple[str, float, float, YarnScaling | None]:
        """theta from the dict, then config, then default; YaRN's parameters as transformers reads them."""
        params = self.rope_parameters(c, source)
        rope_type = self.rope_type(c, source)
        theta = params.get("rope_theta", c.cfg.get("rope_theta", self.default_rope_theta))
        factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
        if rope_type not in ROPE_TYPES:
            raise ModelLoadError(
                f"{source}: rope type {rope_type!r} is not supported; supported: {sorted(ROPE_TYPES)}"
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0 or c.cfg.get("partial_rotary_factor", 1.0) not in (1.0, None):
            raise ModelLoadError(f"{source}: partial_rotary_factor != 1 is not supported")
        yarn = _yarn(params, c, source) if rope_type == "yarn" else None
        return rope_type, float(theta), factor, yarn


def _yarn(params: Mapping[str, Any], c: ConfigReader, source: str) -> YarnScaling:
    """YaRN keys with transformers' defaults: original_max_position_embeddings from the config's
    top level, then the rope dict, then max_position_embeddings; a missing factor to their ratio, beta_fast/beta_slow to 32/1."""
    max_pos = c.positive_int("max_position_embeddings")
    original = c.cfg.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / original
    try:
        return YarnScaling(factor=float(factor), original_max_position_embeddings=int(original),
                           beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                           mscale=_opt_float(params.get("mscale")), mscale_all_dim=_opt_float(params.get("mscale_all_dim")),
                           attention_factor=_opt_float(params.get("attention_factor")),
                           truncate=bool(params.get("truncate", True)))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: invalid yarn rope parameters {dict(params)!r} ({exc})") from None


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _eos_ids(value: Any, extra: tuple[int, ...]) -> tuple[int, ...]:
    ids = [] if value is None else ([value] if isinstance(value, int) else list(value))
    for e in extra:
        if e not in ids:
            ids.append(e)
    return tuple(int(i) for i in ids)


def _serving_dtype(requested: str, cfg: Mapping[str, Any], source: str) -> str:
    if requested != "auto":
        if requested not in SERVING_DTYPES:
            raise ModelLoadError(f"model.dtype={requested!r} is not one of {('auto', *SERVING_DTYPES)}")
        return requested
    found = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    found = str(found).removeprefix("torch.")
    if found not in SERVING_DTYPES:
        raise ModelLoadError(f"{source}: checkpoint dtype {found!r} cannot be served; set model.dtype to one of {SERVING_DTYPES}")
    return found
