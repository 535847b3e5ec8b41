"""CUDA kernel for `greedy_balanced` on bf16/fp16 scores with E % k == 0 (E <= 256, E/k <= 32).

Same function as `server.moe.routing.greedy.greedy_balanced_torch`: within a round of T = E/k
tokens every expert is taken once, and token j takes its k highest-scoring experts among those
tokens 0..j-1 left. That chain is sequential; the Triton kernel spends one bitonic top-k per
token on it (~0.75 µs each, 32 per round at E=256, k=8). This kernel (greedy_route.cu) moves
the sorting off the chain:

1. Prework, one warp per token, the round's tokens in parallel: the token's experts in
   descending (score, -expert id) order, as far as scores lie within 255 bf16/fp16 codes of
   its best, by a stable counting sort over exact codes. Every expert outside that prefix
   scores below every expert in it.
2. Chain, one warp per round: token j's picks are the first k untaken experts of its list, one
   ballot per 32 list positions. If the list runs out first (scores spread wider than the
   window), the remaining picks are exact warp max-reductions. Once at most 32 experts are
   left, one per lane, the picks are ranks among those lanes by 32 shuffles.
The chain starts on the first half of the round's tokens while the second half is ranked
(named barriers). Keys and tie-breaks equal the torch path's, so the ids are identical; the
GPU test checks it across shapes, ties and wide or biased score spreads.

Compiled at first use with NVRTC through `torch.cuda._compile_kernel` (no extra dependency) and
launched with one driver call. `greedy_balanced_cuda` returns None where it does not apply or
cannot compile, and the caller falls back to the Triton kernel.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_EXPERTS = 256  # an expert id fits the low 8 bits of a 24-bit key
MAX_TOKENS_PER_ROUND = 32  # one chain lane per remaining expert once <= 32 are left
PREWORK_WARPS = 16

CUDA_SOURCE = (Path(__file__).parent / "greedy_route.cu").read_text()


def shared_bytes(num_experts: int, top_k: int, prework_warps: int) -> int:
    """Dynamic shared memory of one CTA: `struct Smem` in greedy_route.cu, plus alignment slack."""
    tokens = num_experts // top_k
    return (3 * tokens * num_experts + 6 * prework_warps * 256 + 4 * tokens + num_experts
            + tokens * top_k + 32 + 64)


class _Launcher:
    """A compiled variant plus prebuilt ctypes arguments: a launch is one driver call."""

    def __init__(self, kernel, num_experts: int, top_k: int) -> None:
        self.kernel = kernel
        self.tokens_per_round = num_experts // top_k
        self.prework_warps = min(self.tokens_per_round, PREWORK_WARPS)
        self.block = 32 * (self.prework_warps + 1)
        self._scores = ctypes.c_void_p()
        self._out = ctypes.c_void_p()
        self._n = ctypes.c_int()
        self._stride = ctypes.c_int()
        values = (self._scores, self._out, self._n, self._stride)
        self._params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        self._libcuda = torch.cuda._utils._get_gpu_runtime_library()
        self.shared_bytes = shared_bytes(num_experts, top_k, self.prework_warps)
        kernel.set_shared_memory_config(self.shared_bytes)

    def __call__(self, scores: torch.Tensor, out: torch.Tensor) -> None:
        n = scores.shape[0]
        self._scores.value = scores.data_ptr()
        self._out.value = out.data_ptr()
        self._n.value = n
        self._stride.value = scores.stride(0)
        rounds = -(-n // self.tokens_per_round)
        stream = torch.cuda.current_stream(scores.device).cuda_stream
        err = self._libcuda.cuLaunchKernel(self.kernel.func, rounds, 1, 1, self.block, 1, 1, self.shared_bytes,
                                           ctypes.c_void_p(stream), self._params, None)
        if err != 0:
            raise RuntimeError(f"greedy_balanced CUDA kernel launch failed (CUresult {err})")


@functools.lru_cache(maxsize=None)
def _launcher(num_experts: int, top_k: int, device_index: int) -> _Launcher | None:
    tokens = num_experts // top_k
    warps = min(tokens, PREWORK_WARPS)
    defines = (f"#define NE {num_experts}\n#define NK {top_k}\n#define NT {tokens}\n#define NP {warps}\n"
               f"#define SMEM_BYTES {shared_bytes(num_experts, top_k, warps)}\n")
    try:
        with torch.cuda.device(device_index):
            kernel = torch.cuda._compile_kernel(defines + CUDA_SOURCE, "greedy_rounds")
        return _Launcher(kernel, num_experts, top_k)
    except Exception as exc:  # no NVRTC, old torch, unsupported GPU: the Triton kernel serves
        log.warning("greedy_balanced CUDA kernel unavailable (%s); using the Triton kernel", exc)
        return None


def cuda_kernel_applies(router_logits: torch.Tensor, top_k: int) -> bool:
    """Shapes and dtypes this kernel handles; others go to the Triton kernel."""
    num_experts = router_logits.shape[1]
    return (router_logits.is_cuda and router_logits.dtype in (torch.bfloat16, torch.float16)
            and num_experts <= MAX_EXPERTS and num_experts % top_k == 0
            and num_experts // top_k <= MAX_TOKENS_PER_ROUND and hasattr(torch.cuda, "_compile_kernel"))


def greedy_balanced_cuda(router_logits: torch.Tensor, top_k: int) -> torch.Tensor | None:
    """[N, E] bf16/fp16 CUDA scores -> [N, k] int32 ids, or None where this kernel does not apply."""
    if not cuda_kernel_applies(router_logits, top_k):
        return None
    launch = _launcher(router_logits.shape[1], top_k, router_logits.device.index or 0)
    if launch is None:
        return None
    out = torch.empty(router_logits.shape[0], top_k, dtype=torch.int32, device=router_logits.device)
    if router_logits.shape[0] == 0:
        return out
    scores = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    launch(scores, out)
    return out
