"""Carry routing recorded on one model shape over to another, and give policies router scores.

A routing source records (or draws) top-k ids for a model of E_s experts, top-k k_s and L_s
MoE layers; the what-if may simulate a model of E experts, top-k k and L layers. The map:

  layers   simulated MoE layer l reads source layer l mod L_s;
  experts  with E = m * E_s and k = c * k_s (c <= m), source expert e becomes the block of m
           experts [e*m, (e+1)*m), and each of a token's k_s choices takes c of its block's
           experts: c consecutive ones (mod m) from a start hashed from the token and slot.
           Per-block loads, and so the imbalance between EP ranks that hold whole blocks, stay
           exactly the source's; which blocks a token combines stays too. Lost: imbalance
           between the experts of one block (each takes c/m of the block's load on average).

Router scores: policies such as greedy_balanced break ties by the router's scores, which a
recorded id list does not carry. `synthesized_scores` ranks a token's k chosen experts first,
in slot order, and the other experts below them in a hashed order: the router's choice is
kept, and what it did not say is deterministic noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...moe.routing.hashing import mix32

_KEY_TOKEN = 0x9E3779B1
_KEY_LAYER = 0x85EBCA77


@dataclass(frozen=True)
class ShapeMap:
    """Source shape (E_s, k_s, L_s) -> simulated shape (E, k); raises ValueError if impossible."""

    source_experts: int
    source_top_k: int
    source_layers: int
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        es, ks, e, k = self.source_experts, self.source_top_k, self.num_experts, self.top_k
        if (es, ks) == (e, k):
            return
        if e % es or k % ks or k // ks > e // es:
            raise ValueError(f"routing recorded with {es} experts top-{ks} cannot be carried to {e} experts top-{k}: "
                             f"needs E a multiple of {es} and k a multiple of {ks} with k/{ks} <= E/{es}")

    @property
    def identity(self) -> bool:
        return (self.source_experts, self.source_top_k) == (self.num_experts, self.top_k)

    def source_layer(self, layer: int) -> int:
        return layer % self.source_layers

    def expand(self, ids: torch.Tensor, token_keys: torch.Tensor, layer: int) -> torch.Tensor:
        """ids [T, k_s] source expert ids, token_keys [T] int64 (any token identity) -> [T, k] int32."""
        if self.identity:
            return ids.to(torch.int32)
        m = self.num_experts // self.source_experts
        c = self.top_k // self.source_top_k
        t, ks = ids.shape
        slot = torch.arange(ks, device=ids.device, dtype=torch.int64)  # [k_s]
        key = token_keys.long()[:, None] * _KEY_TOKEN + slot[None, :] * _KEY_LAYER + layer  # [T, k_s]
        start = mix32(key) % m  # [T, k_s]
        within = (start[..., None] + torch.arange(c, device=ids.device, dtype=torch.int64)) % m  # [T, k_s, c]
        return (ids.long()[..., None] * m + within).reshape(t, ks * c).to(torch.int32)  # [T, k]


def synthesized_scores(ids: torch.Tensor, num_experts: int, token_keys: torch.Tensor, layer: int) -> torch.Tensor:
    """ids [T, k] chosen experts (first = the router's favourite) -> [T, E] float32 scores:
    chosen experts score 2 - j/k by slot j, the others a hashed value in [0, 1)."""
    t, k = ids.shape
    experts = torch.arange(num_experts, device=ids.device, dtype=torch.int64)  # [E]
    key = token_keys.long()[:, None] * _KEY_TOKEN + experts[None, :] * _KEY_LAYER + layer  # [T, E]
    scores = (mix32(key) >> 8).to(torch.float32) / float(1 << 24)  # [T, E] in [0, 1)
    chosen = 2.0 - torch.arange(k, device=ids.device, dtype=torch.float32) / k  # [k]
    return scores.scatter_(1, ids.long(), chosen.expand(t, k).contiguous())
