"""The expanded MLA prefill kernel (server/kernels/mla_prefill_expanded.py) vs its float32+ torch
twin under TRITON_INTERPRET=1 on CPU, in one fresh subprocess (support/interpret.py says why).
Outputs start as NaN, and so does every element of the K/V/query buffers outside the views the
kernel is given (rows past the last key, lanes past a head's width), so a row left unwritten, a
key read past its sequence or a lane read past its width all fail. Tiny widths for speed, plus
the real 128 + 64 / 128 split; real shapes at length 4096+: test_kernels_mla_prefill_expanded_gpu.py."""
from __future__ import annotations

import json

import pytest

from tests.kernels.support.interpret import run_source_in_interpreter

pytest.importorskip("triton")

CASES = [
    # whole prompts, ragged, one empty sequence; default fp32 tiles (16 x 16)
    {"q_lens": [5, 1, 19, 0, 33], "prefix_lens": [0, 0, 0, 0, 0]},
    # chunked prefill: chunks over cached prefixes (one not a tile multiple, one far longer than the chunk)
    {"q_lens": [5, 1, 19, 7], "prefix_lens": [0, 9, 13, 70]},
    # tiles wider than the contexts, query blocks of 32 rows, per-head RoPE keys, 3-wide padded rope
    {"q_lens": [3, 40], "prefix_lens": [2, 25], "config": {"BLOCK_M": 32, "BLOCK_N": 64}, "shared_rope": False,
     "dr": 3, "heads": 2},
    # bf16 with the 16-bit default tiles (128 x 64): one partial query block, unmasked and diagonal tiles
    {"q_lens": [150, 2], "prefix_lens": [20, 130], "dtype": "bfloat16", "heads": 2},
    # widths that are not powers of two (padded loads): nope 24, rope 8, v 20
    {"q_lens": [17, 9], "prefix_lens": [4, 0], "dn": 24, "dv": 20, "config": {"BLOCK_M": 16, "BLOCK_N": 32}},
    # the real split: nope 128 + rope 64 scores, v 128, chunk over a prefix
    {"q_lens": [70, 33], "prefix_lens": [0, 50], "dn": 128, "dr": 64, "dv": 128, "heads": 2, "dtype": "bfloat16",
     "config": {"BLOCK_M": 32, "BLOCK_N": 32}},
]
RUN = """
import json
from tests.kernels.support.mla_prefill_checks import check_mla_prefill_expanded
for params in json.loads({cases!r}):
    print(json.dumps(check_mla_prefill_expanded(**params)))
"""
# the poison works: a grid one query block short leaves rows unwritten (NaN), and the check fails
SHORT_GRID = """
import json, torch
from server.kernels.mla_prefill_expanded import mla_prefill_expanded_triton
from tests.kernels.support.mla_prefill_checks import make_expanded_inputs
q_n, q_r, k_n, k_r, v, cu_q, cu_k = make_expanded_inputs([40], [3], 2, 16, 8, 16, torch.float32, "cpu")
out = torch.full((40, 2, 16), float("nan"))
# a grid of one 16-row query block for 40 rows
mla_prefill_expanded_triton(q_n, q_r, k_n, k_r, v, cu_q, cu_k, 0.2, max_query_len=16, out=out)
print(json.dumps({"nan_rows": int(out.isnan().any(-1).any(-1).sum())}))
"""


def test_cases_match_the_reference() -> None:
    out = run_source_in_interpreter(RUN.format(cases=json.dumps(CASES)), timeout_s=240)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == len(CASES)
    for params, r in zip(CASES, rows):
        assert r["ok"], (params, r)


def test_unwritten_rows_stay_poisoned() -> None:
    out = run_source_in_interpreter(SHORT_GRID, timeout_s=120)
    assert json.loads(out.strip().splitlines()[-1]) == {"nan_rows": 24}
