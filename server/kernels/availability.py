"""Whether the Triton path can run for a tensor: CUDA tensor + importable Triton.

Kept free of any Triton import so CPU-only installs (no triton wheel) can import the kernel
front door (`ops.py`) and fall back to the torch twins.
"""
from __future__ import annotations

import functools
import os

import torch

# Set to "torch" to force the torch twins on GPU too (baselines, debugging).
BACKEND_ENV = "EPSERVE_KERNEL_BACKEND"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when `import triton` works (CUDA still has to be checked per tensor)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through numpy (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_backend(device: torch.device | str | None) -> str:
    """'triton' on CUDA with Triton importable, else 'torch'; EPSERVE_KERNEL_BACKEND overrides
    (read now: a model reads it once, when it is built, server/kernels/backend.py)."""
    forced = os.environ.get(BACKEND_ENV, "").strip()
    if forced:
        return forced
    if device is not None and torch.device(device).type == "cuda" and triton_available():
        return "triton"
    return "torch"


def resolve_backend(requested: str, tensor: torch.Tensor) -> str:
    """'auto' -> default_backend(tensor's device); an explicit name is returned as is (callers
    validate it against their registry). For the per-call front door (server/kernels/ops.py)."""
    return default_backend(tensor.device) if requested == "auto" else requested


def dot_mode(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for tl.dot on operands of `dtype`.

    fp32 operands use "ieee" (exact fp32 products; these paths exist for tests, not speed).
    Triton's interpreter multiplies bf16 as raw uint16 bit patterns (it has no bf16 matmul),
    so under the interpreter bf16 operands are widened to fp32 first; bf16 x bf16 products are
    exact in fp32, so this matches the tensor-core result up to summation order.
    """
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return precision, dtype == torch.bfloat16 and interpreter_enabled()
