"""The head-block MLA decode kernel (server/kernels/mla_decode.py) vs the float64 loop reference
under TRITON_INTERPRET=1 on CPU (tiny latent widths; support/interpret.py says why each check
runs in a fresh subprocess). Outputs and kernel workspaces start as NaN, and every cache row no
context covers is NaN too, so a missed store, a masked-tile slip or a merge that reads a split
nobody wrote all fail. Larger and real-width cases: test_kernels_mla_decode_gpu.py."""
from __future__ import annotations

import json

import pytest

from tests.kernels.support.interpret import run_source_in_interpreter

pytest.importorskip("triton")

# Random batches: B, ragged L (1 .. a few hundred), page size, tile, splits, heads, dtype drawn
# from a fixed seed; each line of output is one check's result.
RANDOM_CASES = """
import json, random
from tests.kernels.support.mla_checks import check_mla_decode
rng = random.Random(7)
for i in range(9):
    batch = rng.randint(1, 4)
    ctx = [rng.choice([1, rng.randint(2, 40), rng.randint(41, 260)]) for _ in range(batch)]
    page, block_n = rng.choice([4, 8, 16, 32, 64]), rng.choice([16, 32])
    heads = rng.choice([1, 3, 16, 20])
    splits = [1, 2, 3, 5][i % 4]
    cfg = {"BLOCK_H": 16, "BLOCK_N": block_n, "min_split_tokens": rng.choice([16, 32, 64])}
    r = check_mla_decode(ctx_lens=ctx, heads=heads, v_dim=32, rope_dim=rng.choice([8, 16]), block_size=page,
                         dtype=["float32", "bfloat16"][i % 2], num_splits=splits, kernel="triton_decode",
                         config=cfg, poison_rows=True, seed=i)
    r.update(ctx=ctx, page=page, block_n=block_n, heads=heads, min_split_tokens=cfg["min_split_tokens"])
    print(json.dumps(r))
"""


def test_random_batches_match_the_reference() -> None:
    rows = [json.loads(line) for line in run_source_in_interpreter(RANDOM_CASES, timeout_s=240).splitlines()
            if line.startswith("{")]
    assert len(rows) == 9
    for r in rows:
        assert r["ok"] and r["poisoned_rows"] > 0, r
    # what the draw covers: several splits that really split a context, tiles inside one page and
    # tiles spanning pages, contexts that cross page boundaries, head blocks with padded heads
    assert any(r["num_splits"] > 1 and max(r["ctx"]) > 2 * r["min_split_tokens"] for r in rows)
    assert any(r["block_n"] <= r["page"] for r in rows) and any(r["block_n"] > r["page"] for r in rows)
    assert any(c > r["page"] and c % r["page"] for r in rows for c in r["ctx"])
    assert any(r["heads"] % 16 for r in rows) and any(r["heads"] > 16 for r in rows)


FIXED_CASES = [
    {"dtype": "float32", "ctx_lens": [520, 3]},  # the default config and split choice: 2 splits
    # (4 interpreter "SMs", 2 sequences, 520-token tables: test_mla_decode_config.py checks the plan)
    {"dtype": "bfloat16", "ctx_lens": [150, 1, 77], "heads": 8, "block_size": 16, "num_splits": 1,
     "config": {"BLOCK_H": 16, "BLOCK_N": 32}},  # one split: the kernel writes the output itself
    {"dtype": "bfloat16", "ctx_lens": [129, 128, 127], "heads": 4, "block_size": 64, "num_splits": 4,
     "config": {"BLOCK_H": 16, "BLOCK_N": 16, "min_split_tokens": 16}, "v_dim": 24},  # padded latent width
]
RUN_FIXED = """
import json
from tests.kernels.support.mla_checks import check_mla_decode
for params in json.loads({cases!r}):
    print(json.dumps(check_mla_decode(kernel="triton_decode", poison_rows=True, **params)))
"""


def test_fixed_cases_match_the_reference() -> None:
    out = run_source_in_interpreter(RUN_FIXED.format(cases=json.dumps(FIXED_CASES)), timeout_s=180)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == len(FIXED_CASES)
    for params, r in zip(FIXED_CASES, rows):
        assert r["ok"], (params, r)


REPLAY = """
import torch
from server.kernels.mla_decode import mla_decode_headblock_triton
from server.kernels.mla_decode_config import MLADecodeConfig
from server.kernels.mla_reference import mla_decode_reference
from tests.kernels.support.mla_checks import make_latent_inputs

q, cache, bt, _, ctx = make_latent_inputs([1] * 3, [40, 90, 7], 4, 32, 16, 8, torch.float32, "cpu")
cfg = MLADecodeConfig(BLOCK_H=16, BLOCK_N=16, min_split_tokens=16)
out = torch.full((3, 4, 32), float("nan"))
mla_decode_headblock_triton(q, cache, bt, ctx, 32, 0.2, config=cfg, num_splits=4, out=out)
ctx.copy_(torch.tensor([33, 3, 8], dtype=torch.int32))  # the next step: same buffers, new lengths (within their pages)
q.copy_(torch.randn_like(q) * 0.5)
mla_decode_headblock_triton(q, cache, bt, ctx, 32, 0.2, config=cfg, num_splits=4, out=out)
ref = mla_decode_reference(q.double(), cache.double(), bt, ctx, 32, 0.2)
print(float((out.double() - ref).norm() / ref.norm()))
"""


def test_same_launch_serves_new_lengths() -> None:
    """What a CUDA-graph replay does: the same launch (static shapes, num_splits fixed) with the
    context lengths changed in place; the lengths are read on the device only."""
    assert float(run_source_in_interpreter(REPLAY, timeout_s=120).strip().splitlines()[-1]) < 2e-5
