"""The tiny model's architecture: one definition, the shipped server/assets/tiny/config.json.

Why the shipped file: it is what the engine and the gRPC tests load (`model=tiny`), so reading
the shape from it (instead of restating it here) keeps training, the build script and the
served model from drifting apart. A run with another shape (tests train a 2-layer one)
overrides fields of `ModelShape`; every other setting (RoPE, norm epsilon, special token ids,
normalised top-k) comes from the same file.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_DIR = ROOT / "server" / "assets" / "tiny"


@dataclass(frozen=True)
class ModelShape:
    """The sizes training may change (vocab 272 = 259 tokenizer ids padded to a multiple of 16)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int  # unused (every layer is MoE), kept for the config's completeness
    max_position_embeddings: int

    @classmethod
    def shipped(cls, folder: Path = TINY_DIR) -> "ModelShape":
        config = shipped_config(folder)
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def shipped_config(folder: Path = TINY_DIR):
    """The shipped model's transformers Qwen3MoeConfig."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig.from_pretrained(folder)


def hf_config(shape: ModelShape, aux_loss_coef: float, folder: Path = TINY_DIR):
    """The shipped config with `shape` and the balance-loss weight put in: the config a run
    trains (and the build script initialises) with."""
    from transformers import Qwen3MoeConfig

    base = json.loads((folder / "config.json").read_text())
    rename = Qwen3MoeConfig.attribute_map  # num_experts is stored as num_local_experts
    sizes = {rename.get(k, k): v for k, v in asdict(shape).items()}
    config = Qwen3MoeConfig.from_dict({**base, **sizes, "router_aux_loss_coef": aux_loss_coef,
                                       "output_router_logits": False, "dtype": "float32"})
    config.architectures = ["Qwen3MoeForCausalLM"]
    return config
