#!/usr/bin/env python3
"""What a CTA-wide step costs the warps of one block (GPU only): named-barrier round trips.

    python scripts/ubench_barriers.py

A design that resolves greedy_balanced's chain in parallel iterations (server/moe/kernels/NOTES.md,
Jacobi) pays one barrier per iteration among the warps that hold the tokens. This measures, for
1, 12 and 16 participating warps of a 17-warp block, SM cycles per iteration of: bar.red.or (a
barrier that also ORs a flag), bar.sync, a shared-memory atomicMin by 8 lanes then bar.sync,
the same then bar.red.or, and two dependent shared loads then bar.sync.
"""
import torch

SRC = r'''
__device__ __forceinline__ bool bar_red_or(int id, int threads, bool v) {
  int r;
  asm volatile("{ .reg .pred p, q; setp.ne.u32 p, %1, 0; bar.red.or.pred q, %2, %3, p; selp.u32 %0, 1, 0, q; }"
               : "=r"(r) : "r"((int)v), "r"(id), "r"(threads) : "memory");
  return r != 0;
}
__device__ __forceinline__ void bar_sync(int id, int threads) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory"); }
extern "C" __global__ void ub(long long* out, int iters, int warps) {
  __shared__ unsigned int sm[1024];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < 1024; i += blockDim.x) sm[i] = 0xFFFFFFFFu;
  __syncthreads();
  if (warp >= warps) return;
  long long t0, t1; unsigned x = lane;
  t0 = clock64();
  for (int i = 0; i < iters; ++i) { if (!bar_red_or(6, 32 * warps, (x & 1) && i < 0)) x++; }
  t1 = clock64(); if (threadIdx.x == 0) out[0] = t1 - t0;
  t0 = clock64();
  for (int i = 0; i < iters; ++i) { bar_sync(6, 32 * warps); x++; }
  t1 = clock64(); if (threadIdx.x == 0) out[1] = t1 - t0;
  t0 = clock64();
  for (int i = 0; i < iters; ++i) { if (lane < 8) atomicMin(&sm[(lane * 37 + i * 11 + warp * 5) & 255], x + i); bar_sync(6, 32 * warps); x++; }
  t1 = clock64(); if (threadIdx.x == 0) out[2] = t1 - t0;
  t0 = clock64();
  for (int i = 0; i < iters; ++i) { if (lane < 8) atomicMin(&sm[(lane * 37 + i * 11 + warp * 5) & 255], x + i); if (!bar_red_or(6, 32 * warps, (x & 1) && i < 0)) x++; }
  t1 = clock64(); if (threadIdx.x == 0) out[3] = t1 - t0;
  t0 = clock64();
  for (int i = 0; i < iters; ++i) { unsigned v = sm[(x * 7 + lane) & 255]; x += (v > 5) ? 1 : 2; unsigned w = sm[(x * 3 + lane) & 255]; x += w & 1; bar_sync(6, 32 * warps); }
  t1 = clock64(); if (threadIdx.x == 0) out[4] = t1 - t0;
  if (x == 12345) out[7] = x;
}
'''


def main() -> None:
    k = torch.cuda._compile_kernel(SRC, "ub")
    out = torch.zeros(8, dtype=torch.int64, device="cuda")
    print(f"device: {torch.cuda.get_device_name()}; 1,000 iterations per loop")
    for warps in (1, 12, 16):
        for _ in range(2):  # the second launch is the one read
            k(grid=(1, 1, 1), block=(32 * 17, 1, 1), args=[out, 1000, warps])
            torch.cuda.synchronize()
        o = (out.cpu().float() / 1000).tolist()
        print(f"{warps} warps, cycles/iter: bar.red.or {o[0]:.0f} | bar.sync {o[1]:.0f} | atomicMin + bar.sync {o[2]:.0f} | atomicMin + bar.red.or {o[3]:.0f} | 2 dependent LDS + bar.sync {o[4]:.0f}")


if __name__ == "__main__":
    main()
