"""Send each (token, expert) pair to the rank owning the expert, run it there, bring it back.

Rank r owns experts [r*E/ep, (r+1)*E/ep). With ep_size > 1 a step is:
  1. sort the N*k pairs by expert id (hence by owning rank);
  2. all_to_all the per-rank pair counts, so every rank knows what it will receive;
  3. all_to_all_single, uneven splits: hidden rows and local expert ids out;
  4. local experts on the received rows;
  5. all_to_all_single back with the splits swapped, unsort, and weight-sum the k results of
     each token on its source rank (float32, then the model dtype).
Every rank joins every collective even with zero tokens. gloo on CPU, NCCL on GPU; with
ep_size == 1 nothing is communicated and no process group is needed. The expert step itself
runs through `experts.path` (experts.py, chosen when the model was built): the torch loop on
CPU, the fused Triton kernels on CUDA. The all-to-all needs the split sizes on the host (one sync per layer), so the EP
path stays eager; ep_size == 1 has no sync and is what CUDA graphs capture.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .experts import LocalExperts, combine  # noqa: F401 (combine: public here too)


class LocalDispatcher:
    """ep_size == 1: every expert is local."""

    ep_size = 1

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> torch.Tensor:
        """x [N, H], ids/weights [N, k] -> [N, H]. On CUDA: fused_moe, no host sync (graph-safe)."""
        return experts.path.local_topk(experts, x, ids, weights)


class AllToAllDispatcher:
    """ep_size > 1: tokens travel to their experts' ranks and back over `group`."""

    def __init__(self, ep_rank: int, ep_size: int, num_experts: int, group: dist.ProcessGroup | None = None) -> None:
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.experts_per_rank = num_experts // ep_size
        self.group = group  # None: the default group (torchrun with world == EP group)

    def _exchange(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=self.group)
        return out

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: LocalExperts) -> torch.Tensor:
        n, k = ids.shape
        hidden = x.shape[1]
        flat = ids.reshape(-1).long()  # [P] expert of each pair, P = N*k
        order = torch.argsort(flat, stable=True)  # [P] pairs grouped by expert, hence by rank
        sorted_ids = flat[order]  # [P]
        dest = sorted_ids // self.experts_per_rank  # [P] owning rank
        send_counts = torch.bincount(dest, minlength=self.ep_size)  # [ep]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        num_recv = sum(recv_splits)

        send_x = x[order // k]  # [P, H] hidden row of each pair's token
        recv_x = self._exchange(x.new_empty(num_recv, hidden), send_x, recv_splits, send_splits)  # [R, H]
        local_ids = sorted_ids - dest * self.experts_per_rank  # [P] id within the owning rank
        recv_ids = self._exchange(local_ids.new_empty(num_recv), local_ids, recv_splits, send_splits)  # [R]

        expert_out = experts.path.rows(experts, recv_x, recv_ids)  # [R, H]
        back = self._exchange(x.new_empty(n * k, hidden), expert_out, send_splits, recv_splits)  # [P, H] sorted order
        pair_out = torch.empty_like(back)
        pair_out[order] = back  # [P, H] in (token, slot) order
        return combine(pair_out, weights, x.dtype)


def make_dispatcher(ep_rank: int, ep_size: int, num_experts: int, group: dist.ProcessGroup | None = None):
    if ep_size == 1:
        return LocalDispatcher()
    return AllToAllDispatcher(ep_rank, ep_size, num_experts, group)
