"""ModelSpec: everything the model code needs to know about a checkpoint's shape.

A family (server/model/families/) parses an HF config.json into one of these, so the model,
the loader, the random-weight builder and the engine all read the same normalised fields and
never the raw, family-specific config keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..layers.rotary_embedding import YarnScaling


class ModelLoadError(RuntimeError):
    """A model folder, config or checkpoint that cannot be served; the message says what and where."""


@dataclass(frozen=True)
class MLAShape:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): queries through a low-rank
    projection (or a plain one when q_lora_rank is None); keys and values compressed into one
    kv_lora_rank latent per token plus a qk_rope_head_dim RoPE key shared by all heads. The KV
    cache stores only that latent row (kv_lora_rank + qk_rope_head_dim values per token)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # RoPE dims stored as interleaved pairs (DeepSeek's layout)
    softmax_scale: float  # qk_head_dim ** -0.5, times the YaRN mscale**2 when rope_parameters ask

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values per token in the KV cache: the compressed KV, then the RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class Fp8BlockScheme:
    """FP8 block quantisation as DeepSeek-V3/R1, Kimi-K2 and Qwen3-FP8 ship it: each quantised
    weight W [out, in] is stored as e4m3 codes next to W_scale_inv [ceil(out/b0), ceil(in/b1)]
    float32, one scale per b0 x b1 block, and W = codes * scale (what "scale_inv" multiplies back).
    Kept in the spec so every rank reads the checkpoint with the same rule."""

    block: tuple[int, int]  # weight_block_size (b0 over output rows, b1 over input columns)
    modules_to_not_convert: tuple[str, ...] = ()  # module-name patterns stored unquantised

    def keeps_unquantised(self, module: str) -> str | None:
        """The modules_to_not_convert pattern that covers `module` (transformers' rule: a regex
        matching its start, or a suffix), None if it is quantised."""
        return next((p for p in self.modules_to_not_convert if re.match(p, module) or module.endswith(p)), None)


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # HF `architectures[0]`, e.g. "Qwen3MoeForCausalLM"
    model_type: str  # the family's HF model_type, e.g. "qwen3_moe"
    num_layers: int
    moe_layer_indices: tuple[int, ...]  # decoder layers that are MoE; MoE-layer index = position here
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # per-head q/k/v width; MLA: qk_rope_head_dim (what RoPE rotates, as transformers' config says)
    vocab_size: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int  # per routed expert
    intermediate_size: int  # dense MLP layers (mlp_only_layers / decoder_sparse_step)
    shared_expert_intermediate_size: int  # 0: no shared expert
    norm_topk_prob: bool  # renormalise the top-k router probabilities to sum to one
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    dtype: str  # serving dtype: "float32" | "bfloat16" | "float16"
    rms_norm_eps: float
    hidden_act: str
    rope_type: str  # "default" | "linear"
    rope_theta: float
    rope_factor: float  # linear scaling factor (1.0 for default rope)
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: str  # "none" | "per_head" (Qwen3: RMSNorm over head_dim) | "full" (OLMoE: over all heads)
    clip_qkv: float | None
    sliding_windows: tuple[int | None, ...]  # per decoder layer; None = full causal attention
    initializer_range: float = 0.02
    rope_yarn: YarnScaling | None = None  # rope_type "yarn" only
    #: router rule (server/moe/router.py) and its group-limited parameters (DeepSeek-V3)
    router_rule: str = "softmax_topk"
    router_groups: int = 1  # n_group: experts split into this many equal groups
    router_topk_groups: int = 1  # topk_group: groups whose experts may be chosen
    routed_scaling_factor: float = 1.0  # routed experts' weights are multiplied by this
    shared_expert_gated: bool = True  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared; DeepSeek: no gate
    mla: MLAShape | None = None  # multi-head latent attention; None: standard (grouped-query) attention
    quantization: Fp8BlockScheme | None = None  # how the checkpoint's weights are stored; None: as values

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layer_indices

    def moe_index(self, layer: int) -> int:
        """Decoder-layer index -> MoE-layer index (what load counters and RoutingContext use)."""
        return self.moe_layer_indices.index(layer)

    def expert_param_count(self) -> int:
        """Parameters of all routed experts of all MoE layers (gate, up and down projections)."""
        return self.num_moe_layers * self.num_experts * 3 * self.hidden_size * self.moe_intermediate_size

    def check_ep_size(self, ep_size: int) -> None:
        if ep_size < 1 or self.num_experts % ep_size:
            divisors = [d for d in range(1, self.num_experts + 1) if self.num_experts % d == 0]
            raise ModelLoadError(
                f"ep_size={ep_size} does not divide the model's {self.num_experts} experts (choose one of {divisors})"
            )
