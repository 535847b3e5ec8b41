"""Counter-based hashing for policies that need randomness.

A stateless hash of (seed, layer, rank, token, expert) instead of a torch.Generator: it is
deterministic by construction, needs no generator state to register with a CUDA graph, and
gives the same numbers on CPU and GPU. Arithmetic stays in int64 with every product below
2**63 (32-bit values times constants < 2**31), so no signed overflow happens on any device.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x2C1B3C6D  # odd, < 2**31


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Avalanche a tensor of int64 values in [0, 2**32) into well-mixed 32-bit values."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    x = x ^ (x >> 16)
    return x


def mix32_int(x: int) -> int:
    """The same function on a Python int (host-side seeds, no device work)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def stream_key(*parts: int) -> int:
    """Fold several small integers (seed, layer, rank, ...) into one 32-bit key."""
    h = 0x9E3779B9
    for p in parts:
        h = mix32_int(h ^ (p & MASK32) ^ ((p >> 32) & MASK32) * 0x85EBCA6B)
    return h
