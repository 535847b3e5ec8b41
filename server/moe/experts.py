"""The routed experts one EP rank owns, stored fused: gate_up_proj [E_local, 2I, H] (gate rows
first, then up: transformers' in-memory layout) and down_proj [E_local, H, I].

How they run is chosen once, when the model is built (EXPERT_PATHS, by the model's
KernelBackend: "torch" on CPU, "triton" on CUDA, EPSERVE_KERNEL_BACKEND / EPSERVE_EXPERT_PATH
override), and kept as `experts.path`:
  torch           `LocalExperts.forward`: rows grouped by expert, one pair of matmuls per expert
                  that has rows (one host sync for the group sizes). The CPU path and the oracle.
  triton          server/moe/kernels: fused_moe straight from the router's top-k slots (no host
                  sync, CUDA-graph safe; slots with a local id of -1 are skipped, which is how the
                  fixed-capacity EP dispatch runs only this rank's experts on every gathered
                  token); on dispatched rows (variable-split EP) an argsort groups them by
                  expert for grouped_expert_mlp, then the output is scattered back.
  grouped_mm      the same two calls through torch._grouped_mm.
  triton_unsorted as triton, but dispatched rows go through expert_mlp_rows in the order they
                  arrive: no argsort and no two row copies. Not the default until a GPU
                  measurement of the EP step says it is faster (EPSERVE_EXPERT_PATH=triton_unsorted).
Experts built with KernelBackend.expert_weights == "fp8" (the loader's choice for FP8 block
checkpoints on CUDA, server/model/expert_format.py) hold e4m3 codes plus *_scale_inv block
scales and run through Fp8ExpertPath (fp8_expert_path.py), whatever the path name says.
Dispatchers (server/moe/dispatch/) call `experts.path.local_topk(experts, ...)` (every slot
local), `.partial_topk(...)` (only slots with a local id >= 0) or `.rows(...)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.backend import KernelBackend
from ..layers.activation import activation
from ..registry import Registry
from .kernels import ops  # noqa: F401  (registers the MoE kernel ops)


def combine(pair_out: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pair_out [N*k, H] in (token, slot) order, weights [N, k] -> [N, H]: sum_j w[i,j] * out[i,j]."""
    n, k = weights.shape
    acc = pair_out.view(n, k, pair_out.shape[-1]).float() * weights.float()[..., None]  # [N, k, H]
    return acc.sum(dim=1).to(dtype)


class LocalExperts(nn.Module):
    def __init__(self, num_local: int, hidden: int, intermediate: int, act: str, first_expert: int = 0,
                 dtype=None, device=None, kernels: KernelBackend | None = None) -> None:
        super().__init__()
        self.num_local, self.hidden, self.intermediate = num_local, hidden, intermediate
        self.first_expert = first_expert  # global id of local expert 0
        kernels = kernels or KernelBackend.for_device(device)
        #: "values" (dtype) or "fp8": e4m3 codes plus fp32 scales per 128x128 block (fp8_expert_path.py)
        self.weight_format = kernels.expert_weights
        #: dtype of the rows these experts take and return (the weights' own, unless they are FP8)
        self.act_dtype = dtype or torch.get_default_dtype()
        fp8 = self.weight_format == "fp8"
        w_dtype = torch.float8_e4m3fn if fp8 else dtype
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * intermediate, hidden, dtype=w_dtype, device=device),
                                         requires_grad=not fp8)
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden, intermediate, dtype=w_dtype, device=device),
                                      requires_grad=not fp8)
        if fp8:  # the checkpoint's weight_scale_inv, one per 128x128 block: [E, ceil(rows/128), ceil(cols/128)]
            blocks = lambda n: -(-n // 128)  # noqa: E731
            self.gate_up_proj_scale_inv = nn.Parameter(torch.empty(
                num_local, blocks(2 * intermediate), blocks(hidden), dtype=torch.float32, device=device), requires_grad=False)
            self.down_proj_scale_inv = nn.Parameter(torch.empty(
                num_local, blocks(hidden), blocks(intermediate), dtype=torch.float32, device=device), requires_grad=False)
        self.act = activation(act)
        #: how these experts run (kernels: the model's choice; None: by `device`)
        self.path = expert_path(kernels)

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())  # codes and scales when fp8

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every parameter indexed by slot ([E_local, ...]: first dim num_local), in registration
        order: gate_up_proj, down_proj, and for fp8 also their *_scale_inv. What a slot holds, so
        whatever copies a slot's expert (EPLB's weight moves) moves all of it, for any format."""
        return [p for p in self.parameters() if p.dim() and p.shape[0] == self.num_local]

    @property
    def bytes_per_slot(self) -> int:
        """Bytes one slot's expert occupies (codes and scales when fp8): what moving it costs."""
        return sum(p[0].numel() * p.element_size() for p in self.slot_tensors())

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x [R, H], local_ids [R] int in [0, E_local) -> [R, H]: row r through expert local_ids[r]."""
        if self.weight_format != "values":
            raise RuntimeError("LocalExperts.forward multiplies value weights; FP8 experts run through their path")
        if x.shape[0] == 0:
            return torch.empty_like(x)
        order = torch.argsort(local_ids, stable=True)  # [R] rows grouped by expert
        counts = torch.bincount(local_ids, minlength=self.num_local).tolist()  # host sync: CPU/eager path
        xs = x[order]  # [R, H]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = xs[start:start + n]  # [n, H]
            gate, up = F.linear(seg, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
            out[start:start + n] = F.linear(self.act(gate) * up, self.down_proj[e])  # [n, H]
            start += n
        result = torch.empty_like(x)
        result[order] = out
        return result


class TorchExpertPath:
    """Plain torch (CPU, baselines): LocalExperts.forward on gathered rows, float32 combine."""

    compiles = False  # nothing JIT-compiled: the start-up warm-up has no variants to cover

    def __init__(self, kernels: KernelBackend) -> None:
        self.name = "torch"

    def local_topk(self, experts: LocalExperts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], ids [N, k] global expert ids (all on this rank), weights [N, k] -> [N, H]."""
        n, k = ids.shape
        token = torch.arange(n, device=x.device).repeat_interleave(k)  # [N*k] token of each pair
        pair_out = experts(x[token], ids.reshape(-1).long() - experts.first_expert)  # [N*k, H]
        return combine(pair_out, weights, x.dtype)

    def partial_topk(self, experts: LocalExperts, x: torch.Tensor, local_ids: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], local_ids [T, k] (-1: not on this rank), weights [T, k] -> [T, H]: for each
        token the float32 sum of w * expert(x) over its local slots, in slot order; zero rows
        for tokens with none. One host sync (which pairs are local): the CPU path."""
        n, k = local_ids.shape
        flat = local_ids.reshape(-1).long()  # [T*k]
        pairs = (flat >= 0).nonzero(as_tuple=True)[0]  # [P] local pairs in (token, slot) order
        token = pairs // k  # [P]
        acc = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
        if pairs.numel():
            y = experts(x[token], flat[pairs])  # [P, H]
            acc.index_add_(0, token, y.float() * weights.reshape(-1)[pairs].float()[:, None])
        return acc.to(x.dtype)

    def rows(self, experts: LocalExperts, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """x [R, H], local_ids [R] -> [R, H] (no routing weight: the EP combine applies it)."""
        return experts(x, local_ids)


class KernelExpertPath:
    """The fused Triton kernels (or torch._grouped_mm with backend "grouped_mm")."""

    compiles = True
    rows_grouped = True  # `rows` groups by expert first: grouped_expert_mlp (no count constexprs)

    def __init__(self, kernels: KernelBackend) -> None:
        self.name = kernels.name
        self.fused_moe = kernels.op("fused_moe")
        self.grouped_expert_mlp = kernels.op("grouped_expert_mlp")

    def topk_variant(self, experts: LocalExperts, num_tokens: int, top_k: int):
        """The compiled variant `local_topk` on num_tokens tokens uses (kernels/variants.py)."""
        from .kernels.variants import topk_variant  # imports triton: only where kernels run

        w = experts.gate_up_proj
        return topk_variant(num_tokens, top_k, experts.num_local, experts.hidden, experts.intermediate, w.dtype, w.device)

    def rows_variant(self, experts: LocalExperts, num_rows: int):
        """The compiled variant `rows` on num_rows dispatched rows uses."""
        from .kernels.variants import rows_variant

        w = experts.gate_up_proj
        return rows_variant(num_rows, experts.num_local, experts.hidden, experts.intermediate, w.dtype, w.device,
                            grouped=self.rows_grouped)

    def local_topk(self, experts: LocalExperts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        local = ids if experts.first_expert == 0 else ids - experts.first_expert  # [N, k]
        return self.fused_moe(x, experts.gate_up_proj, experts.down_proj, local, weights)  # [N, H]

    def partial_topk(self, experts: LocalExperts, x: torch.Tensor, local_ids: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
        """fused_moe over every token with -1 marking the slots it skips: no host sync."""
        return self.fused_moe(x, experts.gate_up_proj, experts.down_proj, local_ids, weights)  # [T, H]

    def rows(self, experts: LocalExperts, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.empty_like(x)
        ids = local_ids.long()  # [R]
        order = torch.argsort(ids, stable=True)  # [R] rows grouped by local expert
        counts = torch.zeros(experts.num_local, dtype=torch.int64, device=x.device)
        counts.index_add_(0, ids, torch.ones_like(ids))  # [E_local]; bincount would sync on CUDA
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [E_local + 1]
        out_sorted = self.grouped_expert_mlp(x[order], offsets, experts.gate_up_proj, experts.down_proj)  # [R, H]
        out = torch.empty_like(x)
        out[order] = out_sorted
        return out


class UnsortedRowsExpertPath(KernelExpertPath):
    """KernelExpertPath whose EP rows skip the argsort and both row copies (expert_mlp_rows)."""

    def __init__(self, kernels: KernelBackend) -> None:
        super().__init__(kernels)
        self.name = "triton_unsorted"
        self.rows_grouped = False
        self.expert_mlp_rows = kernels.op("expert_mlp_rows")

    def rows(self, experts: LocalExperts, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.empty_like(x)
        return self.expert_mlp_rows(x, local_ids, experts.gate_up_proj, experts.down_proj)  # [R, H]


ExpertPath = TorchExpertPath | KernelExpertPath

#: expert path name (KernelBackend.expert_path) -> class built with the model's KernelBackend
EXPERT_PATHS: Registry[type] = Registry("expert path")
EXPERT_PATHS.register("torch", TorchExpertPath)
EXPERT_PATHS.register("triton", KernelExpertPath)
EXPERT_PATHS.register("grouped_mm", KernelExpertPath)
EXPERT_PATHS.register("triton_unsorted", UnsortedRowsExpertPath)


def expert_path(kernels: KernelBackend) -> ExpertPath:
    """How experts run under `kernels` (its expert_path name, by default its backend's; experts
    stored as FP8 blocks take that path's FP8 kernels)."""
    if kernels.expert_weights == "fp8":
        from .fp8_expert_path import Fp8ExpertPath

        return Fp8ExpertPath(kernels)
    return EXPERT_PATHS[kernels.expert_path](kernels)
