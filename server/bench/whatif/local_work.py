"""A rank's own work in a step, without the two things the what-if times or models apart:
the expert kernel (expert_timer.py) and the collectives (wire.py).

The probe model is the served model cut to a few decoder layers (`probe_spec`): the same
attention, norms, router, shared experts, embedding and head, with random weights, run by a
real ModelRunner (staging, decode graphs, sampler). Its dispatcher is the engine's own
with the collectives and the experts taken out:

  allgather  NoWireGatherDispatcher: GatherDispatcher's local stages as they are (pack the
             rank's rows, read local ids off the gathered rows, the float32 reduce of the ep
             partial sums, all at the simulated ep_size's shapes); the all-gather and the
             all-to-all hand back buffers of their real shapes, the experts a zero block.
  local      NoExpertsLocalDispatcher: ep_size 1 has no dispatch work; the experts give zeros.

Zero blocks, not uninitialised ones: the hidden state stays finite, so every later kernel
sees ordinary numbers. They are kept per shape and written once, so no step pays a memset.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...moe.dispatch.all_gather import GatherDispatcher
from ...moe.dispatch.local import LocalDispatcher
from ...moe.dispatch.token_rows import TokenRows


class _ZeroRows:
    """Zero [n, H] blocks, one buffer per (H, dtype, device), grown when asked for more rows.
    A buffer that was outgrown is kept: a decode graph captured earlier still reads it."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._outgrown: list[torch.Tensor] = []

    def __call__(self, n: int, like: torch.Tensor) -> torch.Tensor:
        key = (like.shape[-1], like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < n:
            if buf is not None:
                self._outgrown.append(buf)
            buf = torch.zeros(max(n, 1), like.shape[-1], dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:n]


class NoWireGatherDispatcher(GatherDispatcher):
    """GatherDispatcher's local stages at the simulated ep_size; no collective, no experts."""

    def __init__(self, ep_size: int, num_slots: int, wire: str = "bf16") -> None:
        super().__init__(0, ep_size, num_slots, group=None, wire=wire)  # fp8 wire: its pack and unpack are local work
        self._zeros = _ZeroRows()

    def gather_rows(self, send: torch.Tensor, layout: TokenRows) -> torch.Tensor:
        return layout.empty(self.ep_size * send.shape[0], send.device)  # [ep*R, B], as the all-gather's output

    def run_experts(self, experts, hidden: torch.Tensor, local: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self._zeros(hidden.shape[0], hidden)  # [ep*R, H]

    def return_partials(self, partial: torch.Tensor) -> torch.Tensor:
        return partial  # [ep*R, H], as the all-to-all's output


class NoExpertsLocalDispatcher(LocalDispatcher):
    """ep_size 1: nothing to dispatch; the experts' output is a zero block."""

    collective = False

    def __init__(self) -> None:
        self._zeros = _ZeroRows()

    def __call__(self, x, ids, weights, experts, *, valid=None, rows=None) -> torch.Tensor:
        return self._zeros(x.shape[0], x)


def probe_spec(spec, dense_layers: int, moe_layers: int):
    """`spec` cut to `dense_layers` dense decoder layers followed by `moe_layers` MoE ones."""
    layers = dense_layers + moe_layers
    windows = tuple(spec.sliding_windows[i] if i < len(spec.sliding_windows) else None for i in range(layers))
    return replace(spec, num_layers=layers, moe_layer_indices=tuple(range(dense_layers, layers)),
                   sliding_windows=windows)


def has_dense_layers(spec) -> bool:
    return spec.num_moe_layers < spec.num_layers
