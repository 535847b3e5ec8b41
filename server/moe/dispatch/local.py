"""ep_size 1: every expert is on this rank, nothing travels."""
from __future__ import annotations

import torch

from ..experts import LocalExperts


class LocalDispatcher:
    """The router's top-k slots straight into the experts (fused_moe on CUDA: no host sync)."""

    name = "local"
    ep_size = 1
    collective = False

    def step_rows(self, num_tokens: int, planned: int | None, device: torch.device) -> int | None:
        return planned

    def graph_safe(self, rows: int) -> bool:
        return True

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: LocalExperts, *,
                 valid: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
        """x [N, H], ids/weights [N, k] -> [N, H]. Padding rows (valid False) are computed and
        thrown away by the caller: cheaper than masking at ep_size 1."""
        return experts.path.local_topk(experts, x, ids, weights)
