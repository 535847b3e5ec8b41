"""Variable-split EP dispatch: each (token, expert) pair goes only to the rank owning the expert.

Rank r owns experts [r*E/ep, (r+1)*E/ep). Per MoE layer:
  1. sort the N*k pairs by expert id (hence by owning rank);
  2. all_to_all the per-rank pair counts, and bring them to the host (the split sizes);
  3. one all_to_all_single with uneven splits: each pair's hidden row and its local expert
     id in the same packed row (token_rows.py);
  4. local experts on the received rows (experts.path.rows: grouped by expert by default,
     in arrival order with no copies under EPSERVE_EXPERT_PATH=triton_unsorted);
  5. all_to_all_single back with the splits swapped, unsort, and weight-sum the k results of
     each token on its source rank (float32, then the model dtype).
Three collectives and one host sync per layer: it moves only the pairs that exist, but it
cannot run inside a CUDA graph. It serves steps too large for the fixed-capacity buffers
(all_gather.py). Every rank joins every collective even with zero tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..experts import LocalExperts, combine
from .token_rows import TokenRows


class AllToAllDispatcher:
    """Tokens travel to their experts' ranks and back over `group`, splits decided per layer."""

    name = "alltoall"
    collective = True

    def __init__(self, ep_rank: int, ep_size: int, num_experts: int, group: dist.ProcessGroup | None = None) -> None:
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.experts_per_rank = num_experts // ep_size
        self.group = group  # None: the default group (torchrun with world == EP group)

    def step_rows(self, num_tokens: int, planned: int | None, device: torch.device) -> int | None:
        return None  # splits are exchanged per layer: ranks need not agree on a row count

    def graph_safe(self, rows: int) -> bool:
        return False

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: LocalExperts, *,
                 valid: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
        """x [N, H], ids/weights [N, k] -> [N, H]. Padding rows (valid False) are computed like
        real ones and dropped by the caller; `rows` is not needed."""
        n, k = ids.shape
        flat = ids.reshape(-1).long()  # [P] expert of each pair, P = N*k
        order = torch.argsort(flat, stable=True)  # [P] pairs grouped by expert, hence by rank
        sorted_ids = flat[order]  # [P]
        dest = sorted_ids // self.experts_per_rank  # [P] owning rank
        send_counts = torch.bincount(dest, minlength=self.ep_size)  # [ep]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()  # host sync

        layout = TokenRows(x.shape[1], x.dtype, 1)
        send = layout.empty(n * k, x.device)  # [P, B]: hidden row and local id of each pair
        hidden_v, ids_v, weights_v = layout.fields(send)
        hidden_v.copy_(x[order // k])
        ids_v.copy_((sorted_ids - dest * self.experts_per_rank)[:, None])
        weights_v.zero_()  # unused: the source applies the weights in combine
        recv = layout.empty(sum(recv_splits), x.device)  # [R, B]
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        recv_x, recv_ids, _ = layout.fields(recv)  # [R, H], [R, 1]

        expert_out = experts.path.rows(experts, recv_x, recv_ids[:, 0])  # [R, H]
        back = x.new_empty(n * k, x.shape[1])  # [P, H] in sorted order
        dist.all_to_all_single(back, expert_out.contiguous(), send_splits, recv_splits, group=self.group)
        pair_out = torch.empty_like(back)
        pair_out[order] = back  # [P, H] in (token, slot) order
        return combine(pair_out, weights, x.dtype)
