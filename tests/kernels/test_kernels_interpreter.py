"""Triton kernels vs their torch twins under TRITON_INTERPRET=1 on CPU (tiny shapes, big blocks).

Each case runs tests.kernels.support.checks in a fresh subprocess (support/interpret.py says why
the interpreter cannot be switched on inside this process). The checks poison every buffer the
kernels allocate, draw fresh random inputs, and compare with the torch twin in float64.
"""
from __future__ import annotations

import pytest

from tests.kernels.support.interpret import run_in_interpreter

pytest.importorskip("triton")

CASES = [
    ("align", {"num_tokens": 9, "top_k": 3, "num_experts": 6, "chunk": 1024}),  # one chunk: fused count
    ("align", {"num_tokens": 40, "top_k": 4, "num_experts": 7, "chunk": 32, "skip_frac": 0.3, "seed": 1}),  # 5 chunks
    ("align_offsets", {"counts": [3, 0, 17, 1, 16]}),
    ("fused_moe", {"dtype": "float32"}),
    ("fused_moe", {"dtype": "bfloat16", "num_tokens": 12, "top_k": 2, "num_experts": 4, "hidden": 96, "inter": 40,
                   "skip_frac": 0.3, "block_n": 32, "block_k": 64, "seed": 2}),  # ragged K and N tails
    ("grouped_mlp", {"dtype": "bfloat16", "counts": [5, 0, 19, 1]}),
    ("expert_rows", {"dtype": "bfloat16", "num_rows": 37}),
    ("decode", {"dtype": "float32", "num_splits": 1}),
    ("decode", {"dtype": "bfloat16", "num_splits": 4, "ctx_lens": [1, 40, 9], "q_heads": 6, "kv_heads": 2}),
    ("prefill", {"dtype": "float32"}),
    ("prefill", {"dtype": "bfloat16", "q_lens": [20, 3], "prefix_lens": [0, 30], "head_dim": 24, "seed": 3}),
    ("write_kv", {}),
    ("mla_write", {}),
    ("mla_decode", {"dtype": "float32", "num_splits": 1}),
    ("mla_decode", {"dtype": "bfloat16", "num_splits": 4, "ctx_lens": [1, 40, 9], "heads": 20, "rope_dim": 8}),  # 2 head blocks
    ("mla_prefill", {"dtype": "float32"}),
    ("mla_prefill", {"dtype": "bfloat16", "q_lens": [20, 3], "prefix_lens": [0, 30], "heads": 3, "seed": 3}),  # blocks span tokens
]


@pytest.mark.parametrize("case,params", CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(CASES)])
def test_kernel_matches_torch_in_interpreter(case: str, params: dict) -> None:
    result = run_in_interpreter(case, timeout_s=60, **params)
    assert result["ok"], result
