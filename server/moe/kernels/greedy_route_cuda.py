"""CUDA kernel for `greedy_balanced` on bf16/fp16 scores with E % k == 0 (E <= 256, E/k <= 32).

Same function as `server.moe.routing.greedy.greedy_balanced_torch`: within a round of T = E/k
tokens every expert is taken once, and token j takes its k highest-scoring experts among those
tokens 0..j-1 left. That chain is sequential; the Triton kernel spends one bitonic top-k per
token on it (~0.75 µs each, 32 per round at E=256, k=8). This kernel (greedy_route.cu) moves
the sorting off the chain:

1. Prework, one warp per token, the round's tokens in parallel: the token's experts in
   descending (score, -expert id) order, as far as scores lie within 255 bf16/fp16 codes of
   its best, by a stable counting sort over exact codes. Every expert outside that prefix
   scores below every expert in it. The last tokens of a round (those that find at most 32
   experts left) get no list: they rank among what is left (step 2), so they only store codes.
2. Chain, one warp per round: token j's picks are the first k untaken experts of its list, one
   ballot per 32 list positions. If the list runs out first (scores spread wider than the
   window), the remaining picks are exact warp max-reductions. Once at most 32 experts are
   left, one per lane, the picks are ranks among those lanes; the masks behind those ranks
   (32 shuffles per token) are computed by prework warps, one token each, in parallel.
The chain starts on the first half of the round's tokens while the second half is ranked
(named barriers); the second half's rows are requested only once the first half's have
arrived, so the first half does not share the memory bandwidth with them. Keys and
tie-breaks equal the torch path's, so the ids are identical; the GPU test checks it across
shapes, ties and wide or biased score spreads.

Compiled at first use with NVRTC through `torch.cuda._compile_kernel` (no extra dependency) and
launched with one driver call. `greedy_balanced_cuda` returns None where it does not apply or
cannot compile, and the caller falls back to the Triton kernel.
"""
from __future__ import annotations

import ctypes
import logging
import threading
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
    return (3 * tokens * num_experts + 8 * prework_warps * 256 + 4 * tokens + num_experts
            + tokens * top_k + 32 + 4 + 128 * tokens + 128)


def kernel_defines(num_experts: int, top_k: int, prework_warps: int, smem_bytes: int) -> str:
    """The #defines that size greedy_route.cu for one shape (prepended to the source)."""
    return (f"#define NE {num_experts}\n#define NK {top_k}\n#define NT {num_experts // top_k}\n"
            f"#define NP {prework_warps}\n#define SMEM_BYTES {smem_bytes}\n"
            + ("#define VEC 1\n" if num_experts % 8 == 0 else ""))


class _Launcher:
    """A compiled kernel for one (E, k) plus prebuilt ctypes arguments: a launch is one driver call."""

    def __init__(self, kernel, num_experts: int, top_k: int, device_index: int) -> None:
        self.kernel = kernel
        self.tokens_per_round = num_experts // top_k
        self.prework_warps = min(self.tokens_per_round, PREWORK_WARPS)
        self.block = 32 * (self.prework_warps + 1)
        self.shared_bytes = shared_bytes(num_experts, top_k, self.prework_warps)
        kernel.set_shared_memory_config(self.shared_bytes)
        self._lock = threading.Lock()
        self._scores = ctypes.c_void_p()
        self._out = ctypes.c_void_p()
        self._n = ctypes.c_int()
        self._stride = ctypes.c_int()
        values = (self._scores, self._out, self._n, self._stride)
        self._params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        # Our own handle on the driver, so that fixing argtypes (faster calls) leaves torch's alone.
        self._launch = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
        self._launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        self._launch.restype = ctypes.c_int
        raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        self._stream = (lambda: raw_stream(device_index)) if raw_stream else (lambda: torch.cuda.current_stream(device_index).cuda_stream)

    def __call__(self, scores: torch.Tensor, out: torch.Tensor) -> None:
        n = scores.shape[0]
        with self._lock:  # the argument slots are shared; the driver copies them at launch
            self._scores.value = scores.data_ptr()
            self._out.value = out.data_ptr()
            self._n.value = n
            self._stride.value = scores.stride(0)
            err = self._launch(self.kernel.func, -(-n // self.tokens_per_round), 1, 1, self.block, 1, 1,
                               self.shared_bytes, self._stream(), self._params, None)
        if err != 0:
            raise RuntimeError(f"greedy_balanced CUDA kernel launch failed (CUresult {err})")


def _compile(num_experts: int, top_k: int, device_index: int) -> _Launcher | None:
    tokens = num_experts // top_k
    warps = min(tokens, PREWORK_WARPS)
    defines = kernel_defines(num_experts, top_k, warps, shared_bytes(num_experts, top_k, warps))
    try:
        with torch.cuda.device(device_index):
            kernel = torch.cuda._compile_kernel(defines + CUDA_SOURCE, "greedy_rounds")
            return _Launcher(kernel, num_experts, top_k, device_index)
    except Exception as exc:  # no NVRTC, old torch, unsupported GPU: the Triton kernel serves
        log.warning("greedy_balanced CUDA kernel unavailable (%s); using the Triton kernel", exc)
        return None


def kernel_applies(num_experts: int, top_k: int, dtype: torch.dtype) -> bool:
    """Shapes and dtypes this kernel handles; others go to the Triton kernel."""
    return (dtype in (torch.bfloat16, torch.float16) and num_experts <= MAX_EXPERTS and num_experts % top_k == 0
            and num_experts // top_k <= MAX_TOKENS_PER_ROUND and hasattr(torch.cuda, "_compile_kernel"))


_MISSING = object()
_launchers: dict[tuple, _Launcher | None] = {}  # (E, k, dtype, device) -> compiled kernel or None


def greedy_balanced_cuda(router_logits: torch.Tensor, top_k: int) -> torch.Tensor | None:
    """[N, E] bf16/fp16 CUDA scores -> [N, k] int32 ids, or None where this kernel does not apply.

    Called once per MoE layer per step, so the common path is a dict lookup, one allocation
    and one driver call (what it costs on the host shows in the eager benchmark column).
    """
    n, num_experts = router_logits.shape
    device_index = router_logits.get_device()  # -1 on the CPU
    key = (num_experts, top_k, router_logits.dtype, device_index)
    launch = _launchers.get(key, _MISSING)
    if launch is _MISSING:
        applies = device_index >= 0 and kernel_applies(num_experts, top_k, router_logits.dtype)
        launch = _launchers[key] = _compile(num_experts, top_k, device_index) if applies else None
    if launch is None:
        return None
    out = torch.empty((n, top_k), dtype=torch.int32, device=router_logits.device)
    if n == 0:
        return out
    scores = router_logits
    if scores.stride(1) != 1 or (num_experts % 8 == 0 and (scores.data_ptr() % 16 or scores.stride(0) % 8)):
        scores = scores.clone(memory_format=torch.contiguous_format)  # the kernel loads 16-byte rows
    launch(scores, out)
    return out
