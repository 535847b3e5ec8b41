#!/usr/bin/env python3
"""Latency of the warp primitives the greedy_balanced chain is made of (GPU only).

    python scripts/ubench_warp_latency.py

One warp runs dependent chains of 1,000 iterations of each primitive and prints SM cycles per
iteration (clock64). The last line is the bare chain step of server/moe/kernels/greedy_route.cu
(shared-memory load of a taken flag -> ballot -> popcount -> store), the floor that design's
per-token cost is compared with in server/moe/kernels/NOTES.md.
"""
import torch

SRC = r'''
extern "C" __global__ void ub(long long* out, int iters, int seed) {
  __shared__ unsigned int sm[1024];
  const int lane = threadIdx.x;
  for (int i = lane; i < 1024; i += 32) sm[i] = (i * 7 + 1) & 1023 & ~31 | (i & 31);
  __syncwarp();
  unsigned int x = lane + seed, acc = 0;
  long long t0, t1;
  // 1. LDS pointer chase
  t0 = clock64();
  for (int i = 0; i < iters; ++i) x = sm[(x + lane) & 1023];
  t1 = clock64(); if (lane == 0) out[0] = (t1 - t0); acc += x;
  // 2. STS by other lane -> LDS (syncwarp)
  t0 = clock64();
  for (int i = 0; i < iters; ++i) { sm[lane] = x + 1; __syncwarp(); x = sm[(lane + 1) & 31]; __syncwarp(); }
  t1 = clock64(); if (lane == 0) out[1] = (t1 - t0); acc += x;
  // 3. VOTE chain
  t0 = clock64();
  for (int i = 0; i < iters; ++i) { unsigned b = __ballot_sync(0xffffffffu, (x >> (lane & 7)) & 1); x = b ^ i; }
  t1 = clock64(); if (lane == 0) out[2] = (t1 - t0); acc += x;
  // 4. POPC chain
  t0 = clock64();
  for (int i = 0; i < iters; ++i) x = __popc(x) + x * 3u;
  t1 = clock64(); if (lane == 0) out[3] = (t1 - t0); acc += x;
  // 5. SHFL chain
  t0 = clock64();
  for (int i = 0; i < iters; ++i) x = __shfl_sync(0xffffffffu, x, (x + lane) & 31);
  t1 = clock64(); if (lane == 0) out[4] = (t1 - t0); acc += x;
  // 6. REDUX chain
  t0 = clock64();
  for (int i = 0; i < iters; ++i) x = __reduce_max_sync(0xffffffffu, x + lane) & 0xffff;
  t1 = clock64(); if (lane == 0) out[5] = (t1 - t0); acc += x;
  // 7. IADD chain
  t0 = clock64();
  for (int i = 0; i < iters; ++i) x = x * 5u + 1u;
  t1 = clock64(); if (lane == 0) out[6] = (t1 - t0); acc += x;
  // 8. chain-step like: LDS taken -> vote -> popc -> STS
  unsigned char* tk = (unsigned char*)(sm + 512);
  for (int i = lane; i < 256; i += 32) tk[i] = 0;
  __syncwarp();
  t0 = clock64();
  for (int i = 0; i < iters; ++i) {
    const int e = (lane * 8 + i) & 255;
    const bool ok = !tk[e];
    const unsigned b = __ballot_sync(0xffffffffu, ok);
    const int r = __popc(b & ((1u << lane) - 1u));
    if (ok && r < 8) tk[(e + 1) & 255] = (i & 1);
    __syncwarp();
  }
  t1 = clock64(); if (lane == 0) out[7] = (t1 - t0);
  if (acc == 12345678u) out[9] = acc;
}
'''


def main() -> None:
    k = torch.cuda._compile_kernel(SRC, "ub")
    out = torch.zeros(10, dtype=torch.int64, device="cuda")
    iters = 1000
    for _ in range(2):
        k(grid=(1, 1, 1), block=(32, 1, 1), args=[out, iters, 3])
    torch.cuda.synchronize()
    names = ["LDS chase", "STS->LDS other lane + 2 syncwarp", "VOTE chain", "POPC+IMAD chain", "SHFL chain",
             "REDUX chain", "IMAD chain (compiler may fold it)", "chain-step (LDS,VOTE,POPC,STS,syncwarp)"]
    for i, n in enumerate(names):
        print(f"{n}: {out[i].item() / iters:.1f} cycles/iter")


if __name__ == "__main__":
    main()
