"""The greedy-against-twin harness the FP8 GPU check uses (tests/helpers/greedy_twin.py), held
to exactness on CPU: the padded tiny model computes what the shipped one does, and epserve on
its dequantised FP8 checkpoint in float32 follows the float32 twin's greedy path at every step."""
from __future__ import annotations

import pytest
import torch

from server.config import ModelConfig
from server.model.loader import load_model
from server.moe.routing import build_policy
from tests.helpers.greedy_twin import (PADDED_INTER, TINY, agreement, forced_logits, padded_fp8_checkpoint,
                                       stdlib_prompts, twin_continuations)

PROMPTS, LENGTH, STEPS = 8, 48, 24


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """(padded values folder, its FP8 checkpoint, the dequantised float32 twin)."""
    return padded_fp8_checkpoint(tmp_path_factory.mktemp("greedy_twin"))


def test_padding_keeps_the_function(padded) -> None:
    from transformers import AutoModelForCausalLM

    values, _, _ = padded
    kw = dict(attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    shipped = AutoModelForCausalLM.from_pretrained(TINY, **kw).eval()
    wide = AutoModelForCausalLM.from_pretrained(values, **kw).eval()
    assert wide.config.moe_intermediate_size == PADDED_INTER > shipped.config.moe_intermediate_size
    tokens = torch.tensor([stdlib_prompts(1, 64)[0]])
    with torch.no_grad():
        a, b = shipped(tokens).logits, wide(tokens).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def test_dequantised_fp32_follows_the_twin_exactly(padded) -> None:
    _, fp8, twin = padded
    prompts = stdlib_prompts(PROMPTS, LENGTH)
    assert len({tuple(p) for p in prompts}) == PROMPTS and all(len(p) == LENGTH for p in prompts)
    conts, twin_logits = twin_continuations(twin, prompts, STEPS)
    model = load_model(ModelConfig(path=str(fp8), dtype="float32", quantization="dequantize"),
                       policy=build_policy("natural"), device="cpu")
    report = agreement(twin_logits, forced_logits(model, prompts, conts), conts, margin=0.0)
    assert report["all_equal_share"] == 1.0 and report["rel_err"] < 1e-4, report
    assert report["steps_at_margin"] == PROMPTS * STEPS and not report["confident_flips"]


def test_agreement_catches_a_flip() -> None:
    """A flip at a clear lead is reported; one at a near-tie only counts against all_equal_share."""
    twin = torch.zeros(2, 3, 4)
    twin[:, :, 1] = 2.0  # the twin leads token 1 by 2.0 everywhere ...
    twin[1, 2, 3] = 1.99  # ... except prompt 1's last step: a near-tie with token 3
    ours = twin.clone()
    ours[0, 1, 2] = 5.0  # a confident flip
    ours[1, 2, 3] = 2.01  # a near-tie flip
    report = agreement(twin, ours, [[1, 1, 1], [1, 1, 1]], margin=0.5)
    assert report["all_equal_share"] == 0.0 and report["first_difference"] == [1, 2]
    assert report["confident_flips"] == [(0, 1, 2.0)] and report["flip_leads"] == [0.01, 2.0]
    assert report["steps_at_margin"] == 5
