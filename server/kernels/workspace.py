"""Buffer allocation for the kernels, with an opt-in poison mode for checks.

Kernels allocate every output and intermediate through `workspace`. Checks call
`set_poison(True)`: buffers then start as NaN (floats) or POISON_INT (ints), so an element a
kernel forgot to write, or a padding row it wrongly reads, shows up in the comparison
instead of hiding behind whatever torch.empty happened to return.
"""
from __future__ import annotations

import torch

POISON_INT = -0x5EED
_poison = False


def set_poison(enabled: bool) -> None:
    global _poison
    _poison = bool(enabled)


def workspace(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if not _poison:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else POISON_INT
    return torch.full(shape, fill, dtype=dtype, device=device)
