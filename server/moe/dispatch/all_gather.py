"""Fixed-capacity EP dispatch: all-gather every rank's tokens, compute local experts, send the
partial sums back. No host sync, fixed shapes, no token can be dropped: CUDA graphs capture it.

Per MoE layer, with R rows per rank (the step's common row count, see base.py):
  1. pack x, ids, weights of this rank's R rows into one byte buffer (token_rows.py);
     padding rows carry id -1;
  2. all-gather (all_gather_into_tensor): every rank holds all ep*R packed rows (one exchange);
  3. every rank runs only its own experts on all of them: fused_moe skips the slots whose
     local id is -1, so the GEMMs see exactly the pairs this rank owns, whatever the routing;
  4. all_to_all_single with equal splits sends rank s the partial sums of rank s's rows
     (one exchange back);
  5. the source rank adds the ep partials in float32 in rank order (deterministic), then
     casts to the model dtype.

Bytes per peer and direction: R * H (plus 8k bytes of ids and weights per row), against
R * k * H for an all-to-all that reserves the worst case for every peer; for ep_size <= k
it also moves no more than a perfectly balanced all-to-all (R * k / ep rows per peer).
The cost is memory, not traffic: each rank's fused_moe addresses ep*R*k slots. DeepEP's
low-latency kernels keep a [E_local, ranks * cap, H] receive layout instead; Megatron's
inference all-gather dispatcher makes the same all-gather / reduce-scatter choice for the
same reason (graphs need fixed shapes).

gloo and NCCL both run it; at ep_size 1 it runs over a size-1 group (the EP path on one GPU).

FP8 wire (parallel.dispatch_wire=fp8, wire.py): step 1 packs each hidden row as e4m3 codes plus
a float32 scale per 128 channels (fp8_rows.py), about half the bytes of a bf16 row. The scheme
is the FP8 expert path's own activation quantisation, so where a rank's experts are FP8 blocks
its GEMM reads the received codes and scales as they are (no dequantise, no requantise); other
expert paths get the rows dequantised to the activation dtype. The combine leg (step 4) stays
in the activation dtype: the ep partial sums of a token are added on its rank, and their
rounding would add up across ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..experts import LocalExperts
from .fp8_rows import QuantizedRows
from .token_rows import local_slots
from .wire import RowLayout, row_layout

# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there; the GPU
# image's torch 2.11 has only the old name). Same signature, same collective.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def agree_rows(num_tokens: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """Max of `num_tokens` over the group (a collective and a host sync: eager steps only)."""
    n = torch.tensor([num_tokens], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    return int(n.item())


def expert_rows(layout: RowLayout, buf: torch.Tensor, experts: LocalExperts):
    """Packed rows buf [T, B] -> (hidden, ids [T, k], weights [T, k]) in the form this rank's
    expert path reads: fp8_rows.QuantizedRows where it takes the FP8 wire's codes as they are
    (`takes_quantized_rows`), else [T, H] in the activation dtype. The EP what-if lays out the
    rows it times through this too."""
    return layout.expert_rows(buf, getattr(experts.path, "takes_quantized_rows", False))


def experts_on_rows(experts: LocalExperts, hidden, local: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """hidden [T, H] or fp8_rows.QuantizedRows (what `expert_inputs` gives), local ids and
    weights [T, k] -> [T, H]: the expert path's entry for that form of the rows. The EP
    what-if times its expert kernels through this too."""
    if isinstance(hidden, QuantizedRows):
        return experts.path.partial_topk_quantized(experts, hidden.codes, hidden.scales, local, weights, hidden.dtype)
    return experts.path.partial_topk(experts, hidden, local, weights)


class GatherDispatcher:
    """All-gather dispatch, all-to-all partial-sum combine (see the module docstring)."""

    name = "allgather"
    collective = True

    def __init__(self, ep_rank: int, ep_size: int, num_experts: int, group: dist.ProcessGroup | None = None,
                 wire: str = "bf16") -> None:
        if num_experts % ep_size:
            raise ValueError(f"{num_experts} experts (or slots) do not split over ep_size={ep_size}")
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.wire = wire  # bf16 | fp8: how hidden rows travel on the all-gather (wire.py)
        self.experts_per_rank = num_experts // ep_size
        self.group = group  # None: the default group

    def step_rows(self, num_tokens: int, planned: int | None, device: torch.device) -> int:
        if planned is not None:
            if planned < num_tokens:
                raise ValueError(f"the step plans {planned} rows per rank but this rank has {num_tokens} tokens")
            return planned
        return num_tokens if self.ep_size == 1 else agree_rows(num_tokens, self.group, device)

    def graph_safe(self, rows: int) -> bool:
        return True

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: LocalExperts, *,
                 valid: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
        """x [N, H], ids/weights [N, k], valid [N] bool -> [N, H]. `rows` >= N: the same on every rank."""
        n, k = ids.shape
        if rows is None:
            rows = self.step_rows(n, None, x.device)
        if rows < n:
            raise ValueError(f"rows={rows} < this rank's {n} tokens")
        if rows == 0:  # every rank is empty (rows is common): nothing to exchange
            return torch.empty_like(x)
        layout = row_layout(self.wire, x.shape[1], x.dtype, k)
        send = layout.pack(x, ids, weights, rows, valid)  # [R, B] uint8
        gathered = self.gather_rows(send, layout)  # [ep*R, B]: rank s's rows at s*R
        hidden, local, all_weights = self.expert_inputs(gathered, layout, experts)  # [ep*R, H], [ep*R, k] x2
        partial = self.run_experts(experts, hidden, local, all_weights)  # [ep*R, H]
        returned = self.return_partials(partial)  # [ep*R, H]: block s = rank s's partial sums of my rows
        return self.reduce_partials(returned, n, x.dtype)  # [N, H]

    # ---- the stages of one call: collectives (gather_rows, return_partials) and this rank's
    # local work around them. The EP what-if (server/bench/whatif) runs the local stages of
    # every rank in one process and models the two collectives instead of running them.
    def gather_rows(self, send: torch.Tensor, layout: RowLayout) -> torch.Tensor:
        """send [R, B] uint8 -> [ep*R, B]: every rank's packed rows, rank order (one collective)."""
        gathered = layout.empty(self.ep_size * send.shape[0], send.device)
        _all_gather(gathered, send, group=self.group)
        return gathered

    def expert_inputs(self, gathered: torch.Tensor, layout: RowLayout,
                      experts: LocalExperts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The gathered rows as this rank's expert kernel reads them: hidden [T, H] (a strided
        view; on the fp8 wire a dequantised copy, or fp8_rows.QuantizedRows for FP8 experts),
        local ids [T, k] (-1 for every slot another rank owns) and weights [T, k]."""
        hidden, all_ids, all_weights = expert_rows(layout, gathered, experts)
        return hidden, self.local_ids(all_ids, experts.first_expert, experts.num_local), all_weights

    @staticmethod
    def local_ids(all_ids: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """[T, k] gathered global ids (or EPLB slots) -> [T, k] local ids of experts [first, first+count)."""
        return local_slots(all_ids, first, count)

    def run_experts(self, experts: LocalExperts, hidden: torch.Tensor, local: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
        """[T, H] (or QuantizedRows), [T, k] local ids and weights -> [T, H]: this rank's experts
        on the gathered rows."""
        return experts_on_rows(experts, hidden, local, weights)

    def return_partials(self, partial: torch.Tensor) -> torch.Tensor:
        """partial [ep*R, H] -> [ep*R, H]: block s of the result is rank s's partial sums of this
        rank's rows (one equal-split all-to-all)."""
        returned = torch.empty_like(partial)
        dist.all_to_all_single(returned, partial, group=self.group)
        return returned

    def reduce_partials(self, returned: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        """returned [ep*R, H] -> [N, H]: the ep partial sums of each row added in float32, rank order."""
        out = returned.view(self.ep_size, -1, returned.shape[-1]).sum(0, dtype=torch.float32)  # [R, H]
        return out[:n].to(dtype)
