"""MoE layer pieces: routing policies, load accounting, dispatch/combine, expert kernels."""
