"""Routed experts per token, for the requests that ask: recorded inside the forward, sent with
the step's outputs.

Each MoE layer copies the logical ids its policy chose (after the policy, before EPLB's physical
mapping) into one preallocated device buffer, `runtime.routed_out` [max_tokens, MoE layers, k]
int16, while that attribute is set. The runner sets it only for steps in which some request
asked (RankBatch.routed_rows), so other steps run exactly the kernels they always ran: nothing
is recorded, copied or allocated (the buffer is allocated on first use). A CUDA graph captured
with the attribute set contains the copies, so decode graphs come in two sets per policy, the
recording one captured on first use (worker/policy_switch.py). After the forward, the rows the
requests want are gathered on the device and copied to the host asynchronously, beside the
sampled tokens. int16 holds any expert id below 32768; the wire format is uint16.
"""
from __future__ import annotations

import numpy as np
import torch

MAX_EXPERTS = 1 << 15  # ids travel as int16 on the device


class RoutedExpertsRecorder:
    def __init__(self, model, max_tokens: int, device: torch.device) -> None:
        self.runtime = model.runtime
        if self.runtime.num_experts > MAX_EXPERTS:
            raise ValueError(f"routed experts are recorded as int16: {self.runtime.num_experts} experts is too many")
        self.max_tokens, self.device = max_tokens, torch.device(device)
        self._buffer: torch.Tensor | None = None

    @property
    def buffer(self) -> torch.Tensor:
        """[max_tokens, MoE layers, k] int16, allocated on first use."""
        if self._buffer is None:
            rt = self.runtime
            self._buffer = torch.zeros(self.max_tokens, rt.num_layers, rt.top_k, dtype=torch.int16, device=self.device)
        return self._buffer

    def arm(self) -> None:
        """The next forward (or graph capture) records into the buffer."""
        self.runtime.routed_out = self.buffer

    def disarm(self) -> None:
        self.runtime.routed_out = None

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """rows [R] int64 token rows of the step just launched -> [R, MoE layers, k] int16 on the
        host (on CUDA an asynchronous copy: read it after the step's event)."""
        index = torch.from_numpy(rows).to(self.device, non_blocking=True)
        picked = self.buffer.index_select(0, index)  # [R, L, k]
        if self.device.type != "cuda":
            return picked
        return picked.to("cpu", non_blocking=True)


def to_wire(rows: list[np.ndarray]) -> bytes:
    """Row blocks [r, L, k] int16 -> little-endian uint16 bytes, concatenated."""
    block = rows[0] if len(rows) == 1 else np.concatenate(rows)
    return block.astype("<u2", copy=False).tobytes()
