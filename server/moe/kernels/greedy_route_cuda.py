"""Warp-per-round CUDA kernel for `greedy_balanced` (bf16/fp16 scores, E % k == 0).

The seed's rule is sequential inside a round: each of the round's E picks depends on the
picks before it, so its latency is E dependent selections. The Triton kernel spends ~0.75 µs
per token on a bitonic top-k; here lane l of a warp owns experts l, l+32, ..., keeps their
keys sorted in registers, and each pick is one `redux.sync` min over the 32 lane heads plus a
register shift in the winning lane. Same keys and tie-breaks as the Triton and torch paths
((-score as ordered 16 bits) << 16 | expert), so the ids are identical.

Compiled at first use with NVRTC through CuPy (present on the GPU image; a CPU install never
imports it). `greedy_balanced_cuda` returns None where it does not apply (fp32 scores,
E % k != 0, E > 512, no CuPy), and the caller falls back to the Triton kernel.
"""
from __future__ import annotations

import functools
from math import lcm

import numpy as np
import torch

CUDA_SOURCE = r"""
// One warp per round of T = E/K tokens (E % K == 0). Lane l owns experts l, l+32, ..., keeps
// their keys sorted in registers; each pick is one warp min-reduction (redux.sync) of the lanes'
// heads, and the winning lane pops its head. Keys: (-score as 16 ordered bits) << 16 | expert.
template <int EPL>
__device__ __forceinline__ void sort_keys(unsigned (&k)[EPL]) {
#pragma unroll
  for (int p = 0; p < EPL; ++p) {
#pragma unroll
    for (int i = (p & 1); i + 1 < EPL; i += 2) {
      unsigned a = k[i], b = k[i + 1];
      k[i] = min(a, b);
      k[i + 1] = max(a, b);
    }
  }
}

template <int EPL>
__device__ __forceinline__ void load_row(const unsigned short* __restrict__ row, int lane, int E,
                                         unsigned short (&v)[EPL]) {
#pragma unroll
  for (int i = 0; i < EPL; ++i) {
    int e = lane + 32 * i;
    v[i] = e < E ? row[e] : (unsigned short)0;
  }
}

template <int EPL>
__device__ void greedy_rounds(const unsigned short* __restrict__ scores, int* __restrict__ out,
                              int n_tokens, int E, int K, int T, long long stride) {
  const int lane = threadIdx.x & 31;
  const long long round = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const long long tok0 = round * T;
  if (tok0 >= n_tokens) return;  // the whole warp leaves together
  unsigned taken = 0;             // bit i: expert lane + 32*i already taken in this round
  unsigned short cur[EPL], nxt[EPL];
  load_row<EPL>(scores + tok0 * stride, lane, E, cur);
  for (int t = 0; t < T; ++t) {
    const long long tok = tok0 + t;
    if (tok >= n_tokens) break;  // uniform over the warp
    if (t + 1 < T && tok + 1 < n_tokens) load_row<EPL>(scores + (tok + 1) * stride, lane, E, nxt);
    unsigned key[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int e = lane + 32 * i;
      const unsigned u = cur[i];
      const unsigned desc = (u & 0x8000u) ? u : (0x7FFFu - u);  // higher score -> smaller
      key[i] = (e < E && !((taken >> i) & 1u)) ? ((desc << 16) | (unsigned)e) : 0xFFFFFFFFu;
    }
    sort_keys<EPL>(key);
    for (int j = 0; j < K; ++j) {
      const unsigned m = __reduce_min_sync(0xFFFFFFFFu, key[0]);
      const int e = (int)(m & 0xFFFFu);
      if (lane == 0) out[tok * K + j] = e;
      if ((e & 31) == lane) {
        taken |= 1u << (e >> 5);
#pragma unroll
        for (int i = 0; i + 1 < EPL; ++i) key[i] = key[i + 1];
        key[EPL - 1] = 0xFFFFFFFFu;
      }
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) cur[i] = nxt[i];
  }
}

#define GREEDY_ENTRY(EPL)                                                                      \
  extern "C" __global__ void greedy_rounds_epl##EPL(const unsigned short* scores, int* out,    \
                                                    int n_tokens, int E, int K, int T,          \
                                                    long long stride) {                         \
    greedy_rounds<EPL>(scores, out, n_tokens, E, K, T, stride);                                 \
  }
GREEDY_ENTRY(1)
GREEDY_ENTRY(2)
GREEDY_ENTRY(4)
GREEDY_ENTRY(8)
GREEDY_ENTRY(16)
"""

_THREADS = 128  # 4 warps = 4 rounds per block


@functools.lru_cache(maxsize=1)
def _module():
    try:
        import cupy as cp
    except Exception:  # no CuPy: the Triton kernel serves
        return None
    return cp, cp.RawModule(code=CUDA_SOURCE, options=("--std=c++17",), backend="nvrtc")


def cuda_kernel_available() -> bool:
    return torch.cuda.is_available() and _module() is not None


def greedy_balanced_cuda(router_logits: torch.Tensor, top_k: int) -> torch.Tensor | None:
    """[N, E] bf16/fp16 CUDA scores -> [N, k] int32 ids, or None if this kernel does not apply."""
    n, num_experts = router_logits.shape
    if (not router_logits.is_cuda or router_logits.dtype not in (torch.bfloat16, torch.float16)
            or num_experts % top_k or num_experts > 512):
        return None
    loaded = _module()
    if loaded is None:
        return None
    cp, module = loaded
    out = torch.empty(n, top_k, dtype=torch.int32, device=router_logits.device)
    if n == 0:
        return out
    scores = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    epl = 1
    while 32 * epl < num_experts:
        epl *= 2
    tokens_per_round = lcm(num_experts, top_k) // top_k  # = E / k here
    rounds = -(-n // tokens_per_round)
    blocks = -(-rounds * 32 // _THREADS)
    fn = module.get_function(f"greedy_rounds_epl{epl}")
    with cp.cuda.Device(router_logits.device.index), cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        fn((blocks,), (_THREADS,), (np.uint64(scores.data_ptr()), np.uint64(out.data_ptr()), np.int32(n),
                                   np.int32(num_experts), np.int32(top_k), np.int32(tokens_per_round),
                                   np.int64(scores.stride(0))))
    return out
