"""Compile the real kernel launches for Hopper (sm_90) on a machine without a GPU; report resources.

The host wrappers run on `meta` tensors at real shapes while JITFunction.run is swapped for a
recorder, so every launch they would make is captured with its exact arguments; each is then
specialised the way Triton's launcher would (16-byte alignment, ints divisible by 16, ints
equal to 1, except where the kernel opted out) and compiled with triton.compile for
GPUTarget("cuda", 90). Triton's bundled cuobjdump reads registers, spills and shared memory
from the cubin, and the SASS shows whether matrix kernels use wgmma (HGMMA) or the older
mma.sync (HMMA) path. `specialization` gives a launch's compile-cache key without compiling.

This catches compile errors, shared-memory overflows and register spills before any device
time is spent. It says nothing about speed.

    python -m tests.kernels.support.compile_check                 # default configs, key shapes
    python -m tests.kernels.support.compile_check --tune-space    # every tune_moe.py candidate
    python -m tests.kernels.support.compile_check --mla-space     # every MLA decode tile the bench sweeps
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, native_specialize_impl

SM90 = GPUTarget("cuda", 90, 32)
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
SMEM_LIMIT = 227 * 1024


@dataclass
class Launch:
    kernel: JITFunction
    bound: dict  # parameter name -> value
    options: dict


@contextlib.contextmanager
def record_launches():
    launches: list[Launch] = []
    original = JITFunction.run

    def recorder(self, *args, grid, warmup, **kwargs):
        names = [p.name for p in self.params]
        bound = dict(zip(names, args))
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_KEYS}
        bound.update(kwargs)
        launches.append(Launch(self, bound, options))

    JITFunction.run = recorder
    try:
        yield launches
    finally:
        JITFunction.run = original


@dataclass
class Compiled:
    name: str
    key: str
    registers: int
    spill_bytes: int
    shared: int
    hgmma: bool
    hmma: bool
    qgmma: bool = False  # FP8 operands on wgmma (SASS QGMMA)


def specialization(launch: Launch) -> tuple:
    """What Triton's launcher keys its compile cache on for this launch (options aside): per
    parameter, the constexpr value, or the type and specialisation attribute (16-byte aligned
    pointers, ints divisible by 16 or equal to 1) unless the kernel opted out for it
    (do_not_specialize / do_not_specialize_on_alignment)."""
    key = []
    for p in launch.kernel.params:
        value = launch.bound[p.name]
        if p.is_constexpr:
            key.append(("constexpr", value))
        else:
            key.append(native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                              not p.do_not_specialize_on_alignment))
    return (launch.kernel.fn.__name__, tuple(key), tuple(sorted(launch.options.items())))


def compile_launch(launch: Launch) -> Compiled:
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(launch.kernel.params):
        value = launch.bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, attr = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":  # ints equal to 1 and None are specialised as constants
            constexprs[(i,)] = attr
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    kernel = triton.compile(src, target=SM90, options=dict(launch.options))
    registers, spills = _resource_usage(kernel.asm["cubin"])
    sass = _sass(kernel.asm["cubin"])
    key = ",".join(f"{launch.kernel.params[i].name}={v}" for (i,), v in constexprs.items()
                   if launch.kernel.params[i].is_constexpr and launch.kernel.params[i].name.isupper())
    key += "".join(f",{k}={v}" for k, v in launch.options.items())
    return Compiled(launch.kernel.fn.__name__, key, registers, spills, kernel.metadata.shared,
                    "HGMMA" in sass, re.search(r"\bHMMA", sass) is not None, "QGMMA" in sass)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _with_cubin(cubin: bytes, args: list[str]) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([*args, f.name], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    out = _with_cubin(cubin, [_tool("cuobjdump"), "--dump-resource-usage"])
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    stack = int(re.search(r"STACK:(\d+)", out).group(1))
    local = int(re.search(r"LOCAL:(\d+)", out).group(1))
    return regs, stack + local


def _sass(cubin: bytes) -> str:
    return _with_cubin(cubin, [_tool("cuobjdump"), "-sass"])


def meta_moe(tokens: int, experts=128, hidden=2048, inter=768, top_k=8):
    m = dict(device="meta", dtype=torch.bfloat16)
    return (torch.empty(tokens, hidden, **m), torch.empty(experts, 2 * inter, hidden, **m),
            torch.empty(experts, hidden, inter, **m), torch.empty(tokens, top_k, device="meta", dtype=torch.int32),
            torch.empty(tokens, top_k, device="meta", dtype=torch.float32))


def meta_fp8_moe(tokens: int, experts=128, hidden=2048, inter=768, top_k=8):
    """Meta inputs of fused_moe_fp8_triton: x, w13, w13_s, w2, w2_s, ids, weights (e4m3 weights,
    fp32 scales per 128x128 block)."""
    x, w13, w2, ids, w = meta_moe(tokens, experts, hidden, inter, top_k)
    f8, f32 = dict(device="meta", dtype=torch.float8_e4m3fn), dict(device="meta", dtype=torch.float32)
    return (x, torch.empty(w13.shape, **f8), torch.empty(experts, -(-2 * inter // 128), -(-hidden // 128), **f32),
            torch.empty(w2.shape, **f8), torch.empty(experts, -(-hidden // 128), -(-inter // 128), **f32), ids, w)


def launches_for_defaults(tokens=(1, 128, 8192)) -> list[Launch]:
    from server.kernels.attention_decode import paged_decode_attention_triton, write_kv_cache_triton
    from server.kernels.attention_prefill import prefill_attention_triton
    from server.moe.kernels.fused_moe import expert_mlp_rows_triton, fused_moe_triton, grouped_expert_mlp_triton
    from server.moe.kernels.fused_moe_fp8 import fused_moe_fp8_triton

    m = dict(device="meta", dtype=torch.bfloat16)
    i32 = dict(device="meta", dtype=torch.int32)
    with record_launches() as launches:
        for t in tokens:
            fused_moe_triton(*meta_moe(t))
            fused_moe_fp8_triton(*meta_fp8_moe(t))
        _, w13, w2, _, _ = meta_moe(1, experts=32)
        grouped_expert_mlp_triton(torch.empty(4096, 2048, **m), torch.empty(33, **i32), w13, w2)
        expert_mlp_rows_triton(torch.empty(4096, 2048, **m), torch.empty(4096, **i32), w13, w2)
        kc = torch.empty(4096, 16, 4, 128, **m)
        for seqs, width, splits in ((128, 32, 1), (4, 1024, 16)):  # short contexts; long (split-KV + merge)
            paged_decode_attention_triton(torch.empty(seqs, 32, 128, **m), kc, kc, torch.empty(seqs, width, **i32),
                                          torch.empty(seqs, **i32), num_splits=splits)
        prefill_attention_triton(torch.empty(8192, 32, 128, **m), kc, kc, torch.empty(128, 8, **i32),
                                 torch.empty(129, **i32), torch.empty(128, **i32), max_query_len=64)
        write_kv_cache_triton(torch.empty(64, 4, 128, **m), torch.empty(64, 4, 128, **m), kc, kc,
                              torch.empty(64, device="meta", dtype=torch.int64))
        launches_for_mla_decode(((128, 1), (2, 16)))  # DeepSeek-V3 decode: one split; split-KV + merge
    return launches


def launches_for_mla_decode(batches_splits, configs=(None,)) -> None:
    """Head-block MLA decode launches at DeepSeek-V3 widths (128 heads, 512 + 64, page 16), into
    the enclosing record_launches()."""
    from server.kernels.mla_decode import mla_decode_headblock_triton

    m = dict(device="meta", dtype=torch.bfloat16)
    i32 = dict(device="meta", dtype=torch.int32)
    cache = torch.empty(4096, 16, 576, **m)
    for cfg in configs:
        for seqs, splits in batches_splits:
            mla_decode_headblock_triton(torch.empty(seqs, 128, 576, **m), cache, torch.empty(seqs, 256, **i32),
                                        torch.empty(seqs, **i32), 512, 0.07, config=cfg, num_splits=splits)


def launches_for_mla_space() -> list[Launch]:
    """Every head-block tile candidate scripts/bench_mla_decode.py --sweep tries (split launches)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts"))
    import bench_mla_decode  # noqa: E402  (the bench's candidate list is the single source of truth)

    from server.kernels.mla_decode_config import MLADecodeConfig

    with record_launches() as launches:
        launches_for_mla_decode(((2, 16),), [MLADecodeConfig(*t) for t in bench_mla_decode.HEADBLOCK_TILES])
    return launches


def launches_for_tune_space(tokens=(1, 64, 512, 8192)) -> list[Launch]:
    """Every (BLOCK_M, GEMM) candidate scripts/tune_moe.py would try for these token buckets."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts"))
    import tune_moe  # noqa: E402  (the script's candidate lists are the single source of truth)

    from server.moe.kernels.moe_align import moe_align_block_size
    from server.moe.kernels.moe_gemm import down_scatter, gate_up_silu

    with record_launches() as launches:
        for t in tokens:
            x, w13, w2, ids, w = meta_moe(t)
            for bm in tune_moe.block_m_candidates(t * 8 / 128):
                al = moe_align_block_size(ids, 128, bm)
                act = torch.empty(al.sorted_ids.shape[0], 768, device="meta", dtype=torch.bfloat16)
                slots = torch.empty(t * 8, 2048, device="meta", dtype=torch.bfloat16)
                for c in tune_moe.gemm_candidates(bm, 2):
                    gate_up_silu(x, w13, al, c, row_div=8, act=act)
                for c in tune_moe.gemm_candidates(bm, 1):
                    down_scatter(act, w2, al, c, slots, w.reshape(-1))
    return launches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune-space", action="store_true")
    ap.add_argument("--mla-space", action="store_true")
    args = ap.parse_args(argv)
    launches = (launches_for_tune_space() if args.tune_space else launches_for_mla_space() if args.mla_space
                else launches_for_defaults())
    seen, bad = set(), 0
    print(f"{'kernel':<24} {'regs':>4} {'spill':>5} {'smem_KB':>7} {'mma':>5}  constexprs/options")
    for launch in launches:
        try:
            c = compile_launch(launch)
        except Exception as exc:
            bad += 1
            print(f"{launch.kernel.fn.__name__:<24} COMPILE ERROR {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if (c.name, c.key) in seen:
            continue
        seen.add((c.name, c.key))
        flag = c.spill_bytes > 0 or c.shared > SMEM_LIMIT
        bad += flag
        mma = "wgmma" if c.hgmma or c.qgmma else ("mma" if c.hmma else "-")
        print(f"{c.name:<24} {c.registers:>4} {c.spill_bytes:>5} {c.shared / 1024:>7.1f} {mma:>5}  {c.key}"
              f"{'  <-- SPILL/SMEM' if flag else ''}", flush=True)
    print(f"# {len(seen)} distinct kernels compiled for sm_90, {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
