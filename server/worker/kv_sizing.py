"""How many KV-cache blocks a rank gets.

On CUDA with engine.gpu_memory_utilization > 0, the cache takes what is left of that fraction
of the device's memory once the weights are loaded, less a headroom for one step's activations
and the decode CUDA graphs (captured after the cache is allocated, so estimated here rather
than measured) — the rule vLLM and SGLang apply, so a bigger GPU serves more sequences without
a config change. Every EP rank computes its own figure and all take the smallest, because the
one scheduler plans every rank with the same block count. On CPU, or with
gpu_memory_utilization=0, the cache is the fixed engine.kv_cache_tokens.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import EngineConfig
from ..kernels.mla_prefill_config import EXPANDED_MAX_KEYS

log = logging.getLogger(__name__)
GRAPH_RESERVE_BYTES = 512 << 20  # decode graph pools, cuBLAS/Triton workspaces, allocator slack


@dataclass(frozen=True)
class KvCacheSize:
    num_blocks: int
    block_size: int
    block_bytes: int  # one block over every layer (k and v, or the MLA latent)
    source: str  # "memory" (sized from free device memory) or "fixed" (engine.kv_cache_tokens)

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    def max_concurrency(self, max_model_len: int, max_num_seqs: int) -> int:
        """Sequences of max_model_len tokens one rank holds at once (also capped by max_num_seqs)."""
        per_seq = -(-max_model_len // self.block_size)
        return min(max_num_seqs, self.num_blocks // per_seq)

    def describe(self, max_model_len: int, max_num_seqs: int, ep_size: int) -> str:
        how = "sized from free device memory" if self.source == "memory" else "engine.kv_cache_tokens"
        per_rank = self.max_concurrency(max_model_len, max_num_seqs)
        return (f"KV cache per rank: {self.num_blocks} blocks x {self.block_size} tokens = {self.tokens} tokens, "
                f"{self.num_blocks * self.block_bytes / 2**30:.2f} GiB ({how}); max concurrency at "
                f"max_model_len={max_model_len}: {per_rank} sequences per rank, {per_rank * ep_size} in all")


def block_bytes(spec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block over every layer, as MoECausalLM.allocate_kv_cache lays it out."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = spec.mla.latent_dim if spec.mla is not None else 2 * spec.num_kv_heads * spec.head_dim
    return spec.num_layers * block_size * per_token * elem


def activation_headroom(spec, engine: EngineConfig, elem: int = 4) -> int:
    """A bound on one step's transient memory: hidden states, attention and expert
    intermediates for the step's tokens, float32 logits of the sampled rows, graph pools, and
    with MLA the expanded prefill's decompressed context (`elem`: the serving dtype's bytes)."""
    tokens = engine.max_num_batched_tokens + engine.max_num_seqs
    per_token = 4 * (8 * spec.hidden_size + 3 * spec.top_k * spec.moe_intermediate_size)
    return (tokens * per_token + engine.max_num_seqs * spec.vocab_size * 4 * 2 + GRAPH_RESERVE_BYTES
            + expanded_prefill_bytes(spec, elem))


def expanded_prefill_bytes(spec, elem: int) -> int:
    """MLA's expanded prefill (kernels.mla_prefill=auto, the default) gathers a step's context
    latent rows and decompresses them through kv_b_proj into per-head keys and values: at most
    EXPANDED_MAX_KEYS rows a step, each latent_dim + heads x (nope + v) elements. DeepSeek-V3 in
    bf16: 2.2 GB, not in the token-proportional bound above, since it follows the cached
    context, not the step's new tokens. 0 without MLA. (kernels.mla_prefill=expanded, forced,
    decompresses every step's whole context; that benchmark setting is not bounded here.)"""
    mla = spec.mla
    if mla is None:
        return 0
    return EXPANDED_MAX_KEYS * (mla.latent_dim + spec.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim)) * elem


def blocks_from_memory(free: int, total: int, utilization: float, block_bytes: int, headroom: int) -> int:
    """Blocks that fit in `utilization` x total, given `free` bytes free now (weights loaded)."""
    budget = int(total * utilization) - (total - free) - headroom
    return max(0, budget // block_bytes)


def kv_cache_size(model, engine: EngineConfig, device: torch.device) -> KvCacheSize:
    """This rank's cache size before the ranks agree (see the module docstring)."""
    size = block_bytes(model.spec, engine.kv_block_size, model.dtype)
    if device.type != "cuda" or engine.gpu_memory_utilization == 0:
        return KvCacheSize(engine.kv_cache_tokens // engine.kv_block_size, engine.kv_block_size, size, "fixed")
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    blocks = blocks_from_memory(free, total, engine.gpu_memory_utilization, size,
                                activation_headroom(model.spec, engine, model.dtype.itemsize))
    if blocks == 0:
        raise RuntimeError(
            f"no room for a KV cache on {device}: engine.gpu_memory_utilization={engine.gpu_memory_utilization} of "
            f"{total / 2**30:.1f} GiB, {(total - free) / 2**30:.1f} GiB in use after loading the weights; raise "
            "engine.gpu_memory_utilization, or set it to 0 and size the cache with engine.kv_cache_tokens")
    return KvCacheSize(blocks, engine.kv_block_size, size, "memory")
