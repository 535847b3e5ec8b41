"""The sampler's per-batch paths give exactly the per-row draws of test_sampler.py: keys
computed for a whole batch in numpy equal sample_key row by row, and drawing only the rows
with temperature > 0 (hot_rows) changes no token."""
from __future__ import annotations

import numpy as np
import torch

from server.worker.sampler import SamplingBatch, sample, sample_key, sample_keys, seed_key
from server.worker.step_plan import SampleSpec


def test_batch_keys_equal_per_row_keys() -> None:
    rng = np.random.default_rng(0)
    seeds = [0, 1, 2**62 + 5, 2**63 - 1, 12345678901234] + rng.integers(0, 2**63 - 1, 59).tolist()
    positions = [0, 1, 4095, 2**31 + 3, 2**32 - 1] + rng.integers(0, 1 << 20, 59).tolist()
    keys = sample_keys(np.array([seed_key(s) for s in seeds], dtype=np.int64), np.array(positions, dtype=np.int64))
    assert keys.tolist() == [sample_key(s, p) for s, p in zip(seeds, positions)]


def test_drawing_only_the_hot_rows_changes_no_token() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 500, generator=g)
    specs = [SampleSpec(0.0 if i % 3 == 0 else 0.5 + 0.1 * i, 0.9 if i % 2 else 1.0, 20 * (i % 4), 1000 + i, True)
             for i in range(9)]
    positions = list(range(30, 39))
    full = SamplingBatch.from_specs(specs, positions, "cpu")
    hot = [i for i, s in enumerate(specs) if s.temperature > 0]
    part = SamplingBatch.from_specs([specs[i] for i in hot], [positions[i] for i in hot], "cpu")
    part.hot_rows = torch.tensor(hot)
    part.want_logprobs, part.all_greedy = True, False
    tokens_full, lps_full = sample(logits, full)
    tokens_part, lps_part = sample(logits, part)
    assert tokens_full.tolist() == tokens_part.tolist()
    assert torch.equal(lps_full, lps_part)
    assert tokens_full[0] == logits[0].argmax()  # a greedy row
