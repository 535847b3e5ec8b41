#!/usr/bin/env python3
"""What one CUDA-graph replay costs around a kernel, apart from the kernel's own work (GPU only).

    python scripts/ubench_graph_overhead.py

The greedy_balanced target is a per-replay time, and the profile script measures rounds in SM
cycles from each CTA's start; this script measures what lies between them: graph replays
(bench_policies.time_graph) of kernels that spin a fixed number of SM cycles per CTA, with the
greedy kernel's launch geometry (CTAs of 544 threads, its dynamic shared memory) and a small
one (32 threads), with 1, 132 and 256 CTAs, against the empty graph. Replay minus spin time = overhead.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_policies import time_graph  # noqa: E402
from server.moe.kernels import greedy_route_cuda as g  # noqa: E402

SPIN = r'''
extern "C" __global__ void spin(int cycles, int* out) {
  extern __shared__ int smem[];
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
  if (threadIdx.x == 0) out[blockIdx.x] = smem[0];
}
'''


def sm_clock_ghz() -> float:
    """SM clock under load (to turn cycle stamps into time): SPIN for 20M cycles on 132 CTAs,
    timed by events."""
    kernel = torch.cuda._compile_kernel(SPIN, "spin")
    out = torch.zeros(132, dtype=torch.int32, device="cuda")
    cycles = 20_000_000
    run = lambda: kernel(grid=(132, 1, 1), block=(32, 1, 1), args=[cycles, out], shared_mem=16)  # noqa: E731
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return cycles / (start.elapsed_time(end) * 1e6)


def main() -> None:
    kernel = torch.cuda._compile_kernel(SPIN, "spin")
    greedy_smem = g.shared_bytes(256, 8, g.PREWORK_WARPS)
    kernel.set_shared_memory_config(greedy_smem)
    out = torch.zeros(256, dtype=torch.int32, device="cuda")
    print(f"device: {torch.cuda.get_device_name()}; graph replays, µs (median of 5 x 500)")
    print(f"empty graph: {time_graph(lambda: None, 500) * 1e6:.2f}")
    small = torch.zeros(1024, device="cuda")
    print(f"one torch kernel (fill 1024 floats): {time_graph(lambda: small.fill_(1.0), 500) * 1e6:.2f}")
    spin0 = lambda: kernel(grid=(1, 1, 1), block=(32, 1, 1), args=[0, out], shared_mem=16)
    print(f"one NVRTC kernel (1 CTA, no spin): {time_graph(spin0, 500) * 1e6:.2f}")
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def fill(ptr):
            tl.store(ptr + tl.arange(0, 32), tl.zeros((32,), tl.float32))

        print(f"one Triton kernel (1 program): {time_graph(lambda: fill[(1,)](small), 500) * 1e6:.2f}")
    except ImportError:
        pass
    geometries = {"x 544 threads, greedy smem": (544, greedy_smem), "x 32 threads, 16 B smem": (32, 16)}
    for name, (threads, smem) in geometries.items():
        for ctas in (1, 132, 256):
            for cycles in (0, 6000, 10000, 16000):
                run = lambda: kernel(grid=(ctas, 1, 1), block=(threads, 1, 1), args=[cycles, out], shared_mem=smem)
                print(f"{ctas} CTAs {name}, spin {cycles} cycles: {time_graph(run, 500) * 1e6:.2f}")


if __name__ == "__main__":
    main()
