"""Activation functions by the names config.json's `hidden_act` uses (transformers' ACT2FN)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

#: config.json `hidden_act` -> function
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def unsupported_activation(name: str) -> str:
    """The message for a `hidden_act` that is not in ACTIVATIONS (families raise it at config read)."""
    return f"hidden_act {name!r} is not supported; supported: {sorted(ACTIVATIONS)}"


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = ACTIVATIONS.get(name)
    if fn is None:
        raise ValueError(unsupported_activation(name))
    return fn
