"""Small @triton.jit helpers shared by the kernels here.

INTERP_BF16 is a constexpr that is True only under Triton's CPU interpreter with bf16 data
(availability.dot_mode). The interpreter has two bf16 gaps, both closed here so interpreter
tests measure the same rounding as the GPU: tl.dot multiplies bf16 bit patterns as integers
(operands are widened to fp32 first: bf16 products are exact in fp32), and fp32 -> bf16
casts truncate instead of rounding to nearest even (rounded by hand below). On the GPU the
flag is False and both helpers compile to the plain operations.
"""
import triton
import triton.language as tl


@triton.jit
def dot_operand(x, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:
        return x.to(tl.float32)
    return x


@triton.jit
def cast_rtne(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """x (fp32) -> dtype with round-to-nearest-even, also under the interpreter."""
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def check_kernel_layout(q, k_cache, v_cache) -> int:
    """What the attention kernels need beyond check_paged_inputs: a contiguous head_dim in q and
    both caches (16-byte vector loads) and a power-of-two page (block) size, which is returned."""
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous head_dim")
    page = k_cache.shape[1]
    if page & (page - 1):
        raise ValueError(f"block_size must be a power of two, got {page}")
    return page


@triton.jit
def cast_e4m3_rtne(x, INTERPRETED: tl.constexpr):
    """x (fp32, |x| <= 448) -> float8e4nv with round-to-nearest-even, also under the interpreter.

    The interpreter's fp32 -> e4m3 cast drops the carry when rounding crosses a power of two
    (31.3 -> 16 instead of 32), so there x is first rounded to an e4m3 value in fp32 by hand
    (3 mantissa bits for normals; multiples of 2^-9 below 2^-6, the subnormal range), which
    the cast then keeps exactly (a zero may lose its sign). On the GPU the flag is False: one cvt.rn.satfinite."""
    if INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        subnormal = (x + 24576.0) - 24576.0  # 24576 = 1.5 * 2^14: its fp32 ulp is 2^-9
        x = tl.where(tl.abs(x) < 0.015625, subnormal, normal)
    return x.to(tl.float8e4nv)
