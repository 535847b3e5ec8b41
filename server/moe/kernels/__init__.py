"""Triton kernels for the GPU hot path; each has a torch twin used on CPU and in tests."""
