"""An FP8 block checkpoint of a trained model on the GPU's FP8 kernels, greedy, against an
independent float32 twin (transformers on the dequantised weights), 32 steps on 40 prompts,
with the same checkpoint dequantised to bf16 on the same GPU as the baseline of the same run
(run on the GPU machine: pytest -m gpu tests/model/test_fp8_greedy_gpu.py -s).

The model is the embedded tiny one, its experts zero-padded to the kernels' 128 channels
(tests/helpers/greedy_twin.py). Its greedy decisions mostly have margins, but not all, so a
fixed share of whole continuations measures the model's near-ties more than the kernels.
Measured on CPU (the prompts Python 3.11's sources give; the GPU image's 3.12 gives others): bf16 arithmetic alone (the dequantised path) follows the
twin for all 32 steps on 77.5% of them; the same FP8 arithmetic as the GPU's (the FP8 kernels
under Triton's interpreter, bf16 activations) on 67.5%, with 1.4% relative logit error, and
every token it changed was one where the twin's top two were within 0.23 logits. So the 90%
of prompts a demanding target would ask for is out of reach for this model even without FP8.
What is held:
  * no flip where the twin's top-1 leads by 0.5 logits or more (a wrong scale, block index or
    dropped expert flips those: O(1) errors);
  * logits within 5% relative L2 of the twin's;
  * whole continuations equal about as often as the bf16 baseline's (within 20 points, 8
    prompts of 40: the CPU run above differs by 4).
The figures are printed as one JSON line for BENCHMARKS.md.
"""
from __future__ import annotations

import json

import pytest
import torch

from server.config import ModelConfig
from server.model.loader import load_model
from server.moe.routing import build_policy
from tests.helpers.greedy_twin import agreement, forced_logits, padded_fp8_checkpoint, stdlib_prompts, twin_continuations

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS, LENGTH, STEPS = 40, 64, 32
MARGIN = 0.5  # logits: a flip at a lead this large is an error, not a near-tie
REL_ERR = 0.05
SHARE_SLACK = 0.2


def test_fp8_kernels_follow_the_fp32_twin(tmp_path) -> None:
    _, fp8_dir, twin = padded_fp8_checkpoint(tmp_path)
    prompts = stdlib_prompts(PROMPTS, LENGTH)
    conts, twin_logits = twin_continuations(twin, prompts, STEPS)
    reports = {}
    for quantization in ("auto", "dequantize"):
        model = load_model(ModelConfig(path=str(fp8_dir), dtype="bfloat16", quantization=quantization),
                           policy=build_policy("natural"), device="cuda")
        formats = {e.weight_format for e in model.moe_experts()}
        assert formats == ({"fp8"} if quantization == "auto" else {"values"}), formats
        reports[quantization] = agreement(twin_logits, forced_logits(model, prompts, conts), conts, MARGIN)
        del model
    fp8, bf16 = reports["auto"], reports["dequantize"]
    print(json.dumps({"device": torch.cuda.get_device_name(), "fp8": fp8, "bf16": bf16}))
    assert not fp8["confident_flips"], fp8
    assert fp8["steps_at_margin"] >= 0.7 * PROMPTS * STEPS, fp8  # the check covers most steps
    assert fp8["rel_err"] < REL_ERR, fp8
    assert fp8["all_equal_share"] >= bf16["all_equal_share"] - SHARE_SLACK, (fp8, bf16)
    assert not bf16["confident_flips"], bf16
