"""MoECausalLM: the served model on one EP rank (attention data-parallel, experts sharded).

Module names mirror transformers' (model.embed_tokens, model.layers.{i}.self_attn.q_proj,
model.layers.{i}.mlp.experts.gate_up_proj, lm_head, ...) so checkpoint names map directly;
a rank's `experts` hold only its E/ep_size experts — or, with EPLB, its (E + R)/ep_size
physical slots, whose logical experts `placement` names.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.backend import KernelBackend
from ..layers.attention import attention_backend_for
from ..layers.layernorm import RMSNorm
from ..layers.rotary_embedding import RotaryEmbedding
from ..moe.dispatch import DispatchSettings, build_dispatcher
from ..moe.eplb.placement import ExpertPlacement
from ..moe.eplb.replica_map import ReplicaMap
from ..moe.load_stats import ExpertLoadCounters
from ..moe.routing import RoutingPolicy
from ..moe.runtime import MoERuntime
from .decoder import DecoderLayer
from .families import get_family
from .forward_batch import ForwardBatch
from .spec import ModelSpec


def attention_width(spec: ModelSpec) -> int:
    """Per-head width the attention kernels see: head_dim, or MLA's kv_lora_rank (latent values)."""
    return spec.mla.kv_lora_rank if spec.mla is not None else spec.head_dim


class DecoderStack(nn.Module):
    def __init__(self, spec: ModelSpec, runtime: MoERuntime, kernels: KernelBackend, dtype=None, device=None) -> None:
        super().__init__()
        family = get_family(spec.architecture)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, family, i, runtime, kernels, dtype=dtype, device=device) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype, device=device, kernels=kernels)


class MoECausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, *, policy: RoutingPolicy, ep_rank: int = 0, ep_size: int = 1,
                 ep_group=None, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 placement: ExpertPlacement | None = None, kernels: KernelBackend | None = None,
                 dispatch: DispatchSettings | None = None) -> None:
        """Parameters are allocated uninitialised on `device` (built on the meta device, then
        `to_empty`: no init kernels for weights that are overwritten anyway); the loader or the
        random-weight builder fills every one of them. `placement` (EPLB): which logical
        expert each physical slot holds; None keeps the block layout with no replica map.
        `kernels`: which kernels every layer runs, chosen here once (None: by `device` and
        EPSERVE_KERNEL_BACKEND, server/kernels/backend.py); so is the attention backend.
        `dispatch` (parallel.dispatch) picks how tokens reach their experts' ranks."""
        super().__init__()
        spec.check_ep_size(ep_size)
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ep_rank={ep_rank} outside [0, ep_size={ep_size})")
        self.spec = spec
        self.ep_rank, self.ep_size, self.ep_group = ep_rank, ep_size, ep_group
        self.dtype = dtype
        self.kernels = kernels or KernelBackend.for_device(device)
        #: metadata class of every step's attention (server/layers/attention.py ATTENTION_BACKENDS)
        self.attention_backend = attention_backend_for(self.kernels, attention_width(spec), dtype)
        if placement is not None and (placement.num_layers, placement.num_experts, placement.ep_size) != (
                spec.num_moe_layers, spec.num_experts, ep_size):
            raise ValueError(f"expert placement for {placement.num_layers} layers x {placement.num_experts} experts at "
                             f"ep {placement.ep_size} does not fit this model at ep {ep_size}")
        self.placement = placement
        num_slots = placement.num_slots if placement is not None else spec.num_experts
        self.load_counters = ExpertLoadCounters(spec.num_moe_layers, spec.num_experts, ep_size, device=device,
                                                num_slots=None if placement is None else num_slots)
        replicas = None if placement is None else ReplicaMap(placement, device)
        self.runtime = MoERuntime(policy=policy, counters=self.load_counters,
                                  dispatcher=build_dispatcher(dispatch, ep_rank, ep_size, num_slots, ep_group),
                                  num_layers=spec.num_moe_layers, num_experts=spec.num_experts, top_k=spec.top_k,
                                  ep_rank=ep_rank, ep_size=ep_size, replicas=replicas,
                                  router_groups=spec.router_groups, router_topk_groups=spec.router_topk_groups)
        self.model = DecoderStack(spec, self.runtime, self.kernels, dtype=dtype, device="meta").to_empty(device=device)
        self.lm_head = None  # tied: the embedding matrix is the output projection
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype, device="meta")
            self.lm_head.to_empty(device=device)
        self.rope = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_type, spec.rope_factor, device=device,
                                    yarn=spec.rope_yarn)
        #: bytes of expert weights read from the checkpoint by this rank (set by the loader)
        self.expert_bytes_read: int | None = None
        #: online rebalancer (server/moe/eplb/rebalance.py), set by the loader when EPLB is on
        self.eplb = None

    # ---- experts held by this rank ----
    def local_expert_ids(self, moe_index: int) -> tuple[int, ...]:
        """Logical expert held by each of this rank's expert slots in MoE layer `moe_index`."""
        if self.placement is None:
            per = self.spec.num_experts // self.ep_size
            return tuple(range(self.ep_rank * per, (self.ep_rank + 1) * per))
        return self.placement.local_experts(moe_index, self.ep_rank)

    def moe_experts(self) -> list:
        """LocalExperts of each MoE layer, by MoE-layer index."""
        return [layer.mlp.experts for layer in self.model.layers if layer.is_moe]

    # ---- engine-facing API ----
    @property
    def policy(self) -> RoutingPolicy:
        return self.runtime.policy

    @policy.setter
    def policy(self, policy: RoutingPolicy) -> None:
        self.runtime.policy = policy

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def expert_bytes_loaded(self) -> int:
        """Bytes of routed-expert weights this rank holds (E/ep_size of the model's experts)."""
        return sum(layer.mlp.experts.num_bytes for layer in self.model.layers if layer.is_moe)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, ...]]:
        """Per layer (k, v), each [num_blocks, block_size, num_kv_heads, head_dim], zeroed; with
        MLA one latent cache per layer, (latent [num_blocks, block_size, kv_lora_rank + rope],).
        Either way entry [0] of a layer is [num_blocks, block_size, ...]."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        zeros = lambda *shape: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        if self.spec.mla is not None:
            return [(zeros(num_blocks, block_size, self.spec.mla.latent_dim),) for _ in range(self.spec.num_layers)]
        shape = (num_blocks, block_size, self.spec.num_kv_heads, self.spec.head_dim)
        return [(zeros(*shape), zeros(*shape)) for _ in range(self.spec.num_layers)]

    @property
    def attention_width(self) -> int:
        return attention_width(self.spec)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """-> [S, V] float32 logits of each sequence's last new token (batch.logits_indices).

        Every EP rank must call this in every step, even with an empty batch: each MoE layer
        runs collectives."""
        if len(kv_caches) != self.spec.num_layers:
            raise ValueError(f"expected {self.spec.num_layers} KV caches (one per layer), got {len(kv_caches)}")
        meta = self.attention_backend.build(batch, kv_caches[0][0].shape[1])
        rows = self.runtime.dispatcher.step_rows(batch.num_tokens, batch.ep_rows, self.device)
        return self.forward_tokens(batch.input_ids, batch.positions, meta, kv_caches, batch.logits_indices,
                                   batch.token_offset, ep_rows=rows)

    @property
    def dispatcher(self):
        """How this model's MoE layers reach other ranks' experts (server/moe/dispatch/)."""
        return self.runtime.dispatcher

    @torch.inference_mode()
    def forward_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, meta,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]], logits_indices: torch.Tensor,
                       token_offset: int | torch.Tensor = 0, valid_rows: torch.Tensor | None = None,
                       ep_rows: int | None = None) -> torch.Tensor:
        """The tensor-only part of `forward` (what a decode CUDA graph captures, gpu/cuda_graphs.py):
        input_ids/positions [T], attention metadata, logits_indices [S] -> [S, V] float32.
        `token_offset` may be a 0-d device tensor; `valid_rows` [T] bool marks real rows of a
        padded batch, so padding stays out of the expert-load counters and the experts; `ep_rows`
        is the step's common MoE row count (every EP rank passes the same). All three travel to
        every MoE layer in one MoEStepContext built here (server/moe/runtime.py)."""
        moe_step = self.runtime.step(token_offset, valid_rows, ep_rows)
        cos_sin = self.rope.cos_sin(positions, self.dtype)  # [T, D] x2
        x = self.model.embed_tokens(input_ids)  # [T, H]
        for layer, kv in zip(self.model.layers, kv_caches):
            x = layer(x, cos_sin, kv, meta, moe_step)
        last = self.model.norm(x[logits_indices])  # [S, H]
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(last, head).float()  # [S, V]
