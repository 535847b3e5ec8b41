"""A dense, independent reference for routing policies: transformers' own modules, run step by
step the way the engine batches (each EP rank's sequences together, with the rank's token
offset), with the policy rewriting the router's choice, and every expert applied to every
token (no dispatch, no sharding). Our sharded EP forward must agree with it exactly.

Only the policy call is shared with the code under test; attention, norms, router and experts
are transformers' modules and weights.
"""
from __future__ import annotations

import torch

from server.moe.routing import RoutingContext

from .scenario import Step, rank_work


class _FullCache:
    """Just enough of a transformers Cache for one sequence: append K/V per layer."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, k, v, layer_idx, *args, **kwargs):  # k, v: [1, Hkv, q, D]
        if layer_idx in self.k:
            k = torch.cat([self.k[layer_idx], k], dim=-2)
            v = torch.cat([self.v[layer_idx], v], dim=-2)
        self.k[layer_idx], self.v[layer_idx] = k, v
        return k, v


def _causal_mask(past: int, q: int, window: int | None, dtype) -> torch.Tensor:
    """[1, 1, q, past + q] additive mask, transformers' rule (kv <= q_pos, kv > q_pos - window)."""
    q_pos = torch.arange(past, past + q)[:, None]
    kv = torch.arange(past + q)[None, :]
    allowed = kv <= q_pos
    if window:
        allowed &= kv > q_pos - window
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


class DenseReference:
    def __init__(self, hf_model, policy, ep_size: int, sliding_windows: tuple) -> None:
        self.hf, self.policy, self.ep_size = hf_model, policy, ep_size
        self.windows = sliding_windows
        body = hf_model.model
        self.moe_layers = [i for i, layer in enumerate(body.layers) if hasattr(layer.mlp, "experts")]
        num_experts = body.layers[self.moe_layers[0]].mlp.experts.num_experts
        self.caches: dict[int, _FullCache] = {}
        self.lens: dict[int, int] = {}
        self.expert_counts = torch.zeros(len(self.moe_layers), num_experts, dtype=torch.int64)

    @torch.no_grad()
    def step(self, step: Step) -> dict[int, torch.Tensor]:
        out = {}
        for rank in range(self.ep_size):
            work, offset = rank_work(step, self.ep_size, rank)
            if work:
                out.update(self._rank_step(rank, work, offset))
        return out

    def _rank_step(self, rank: int, work: Step, offset: int) -> dict[int, torch.Tensor]:
        body = self.hf.model
        hs, pes, starts = [], [], []
        for sid, tokens in work:
            start = self.lens.get(sid, 0)
            h = body.embed_tokens(torch.tensor([tokens]))  # [1, q, H]
            pes.append(body.rotary_emb(h, position_ids=torch.arange(start, start + len(tokens))[None]))
            hs.append(h)
            starts.append(start)
        for li, layer in enumerate(body.layers):
            for j, (sid, tokens) in enumerate(work):
                cache = self.caches.setdefault(sid, _FullCache())
                mask = _causal_mask(starts[j], len(tokens), self.windows[li], hs[j].dtype)
                attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hs[j]), position_embeddings=pes[j],
                                          attention_mask=mask, past_key_values=cache)
                hs[j] = hs[j] + attn
            flat = torch.cat([h[0] for h in hs])  # [N, H] this rank's tokens, batch order
            x = layer.post_attention_layernorm(flat)
            if li in self.moe_layers:
                y = self._moe(layer.mlp, x, self.moe_layers.index(li), rank, offset)
            else:
                y = layer.mlp(x[None])[0]
            flat = flat + y
            hs = list(torch.split(flat, [len(t) for _, t in work]))
            hs = [h[None] for h in hs]
        out = {}
        for j, (sid, tokens) in enumerate(work):
            self.lens[sid] = starts[j] + len(tokens)
            out[sid] = self.hf.lm_head(body.norm(hs[j][0, -1:]))[0].float()
        return out

    def _moe(self, block, x: torch.Tensor, moe_index: int, rank: int, offset: int) -> torch.Tensor:
        router_logits, topk_weights, topk_ids = block.gate(x)  # transformers' router
        experts = block.experts
        ctx = RoutingContext(layer=moe_index, num_experts=experts.num_experts, top_k=topk_ids.shape[1],
                             ep_rank=rank, ep_size=self.ep_size, token_offset=offset)
        ids, weights = self.policy(topk_ids.to(torch.int32), topk_weights, router_logits, ctx)
        self.expert_counts[moe_index] += torch.bincount(ids.reshape(-1).long(), minlength=experts.num_experts)
        every = []  # dense: all experts on all tokens
        for e in range(experts.num_experts):
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            every.append(torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e]))
        every = torch.stack(every)  # [E, N, H]
        picked = every[ids.long(), torch.arange(x.shape[0])[:, None]]  # [N, k, H]
        y = (picked.float() * weights.float()[..., None]).sum(1).to(x.dtype)
        if getattr(block, "shared_expert", None) is not None:  # Qwen2-MoE
            y = y + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        if getattr(block, "shared_experts", None) is not None:  # DeepSeek-V3
            y = y + block.shared_experts(x)
        return y


def run_dense_reference(hf_model, policy, scenario: list[Step], ep_size: int, sliding_windows: tuple):
    """-> ({(step, seq_id): logits [V]}, expert_counts [L_moe, E])"""
    ref = DenseReference(hf_model, policy, ep_size, sliding_windows)
    out = {}
    for i, step in enumerate(scenario):
        for sid, logits in ref.step(step).items():
            out[(i, sid)] = logits
    return out, ref.expert_counts
