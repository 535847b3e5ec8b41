"""bench.expert_precision on CPU: what can be checked without FP8 tensor cores. The key is
validated and refused outside the what-if; the engine's own FP8 decision (expert_format.py)
gates it, so each reason it would keep values comes back as an error naming the key; the
random FP8 experts dequantise to finite weights of the asked spread, in half the bytes of
bf16. The FP8 kernels themselves are timed in test_whatif_gpu.py."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from server.bench.settings import BenchSettings
from server.bench.whatif.expert_precision import expert_kernels, fill_random_fp8, precision_note
from server.config import ConfigError
from server.kernels.backend import KernelBackend
from server.kernels.fp8_blocks import dequantize_blocks
from server.model.loader import read_model_spec
from server.moe.experts import LocalExperts

TRITON = KernelBackend("triton")
HOPPER, AMPERE = (9, 0), (8, 0)


def _spec(intermediate: int = 256):
    spec = read_model_spec(BenchSettings.from_dict({"model": {"name": "tiny"}}).model)
    return replace(spec, moe_intermediate_size=intermediate)


@pytest.mark.parametrize("bench,message", [
    ({"mode": "whatif", "expert_precision": "int4"}, r"bench.expert_precision='int4' is not one of"),
    ({"mode": "static", "expert_precision": "fp8"}, r"bench.expert_precision=fp8 is read by bench.mode=whatif only"),
])
def test_settings_refuse_bad_precisions_naming_the_key(bench, message):
    with pytest.raises(ConfigError, match=message):
        BenchSettings.from_dict({"model": {"name": "tiny"}, "bench": bench})


def test_fp8_where_the_engine_would_run_it_and_dtype_everywhere():
    assert expert_kernels("fp8", _spec(), TRITON, "cuda", capability=HOPPER).expert_weights == "fp8"
    assert expert_kernels("dtype", _spec(), replace(TRITON, expert_weights="fp8"), "cpu").expert_weights == "values"


def test_fp8_with_eplb_variants_builds_fp8_experts_for_every_slot():
    """EPLB variants no longer refuse fp8: a rank's timer experts (replica slots included) are
    all e4m3 codes with their own block scales."""
    settings = BenchSettings.from_dict({"model": {"name": "tiny"},
                                        "bench": {"mode": "whatif", "expert_precision": "fp8",
                                                  "eplb_redundant_per_rank": [0, 1]}})
    assert settings.bench.expert_precision == "fp8" and list(settings.bench.eplb_redundant_per_rank) == [0, 1]
    kernels = expert_kernels("fp8", _spec(), TRITON, "cuda", capability=HOPPER)
    slots = 5  # e.g. 4 experts per rank plus one replica
    experts = LocalExperts(slots, 384, 256, "silu", dtype=torch.bfloat16,
                           kernels=replace(kernels, expert_weights="fp8"))
    fill_random_fp8(experts, 0.02, torch.Generator().manual_seed(0))
    for codes, scales in ((experts.gate_up_proj, experts.gate_up_proj_scale_inv),
                          (experts.down_proj, experts.down_proj_scale_inv)):
        assert codes.dtype == torch.float8_e4m3fn and codes.shape[0] == scales.shape[0] == slots
        assert bool((scales > 0).all())


@pytest.mark.parametrize("device,kernels,capability,intermediate,message", [
    ("cpu", KernelBackend("torch"), None, 256, "CUDA only"),
    ("cuda", TRITON, AMPERE, 256, "compute capability 8.0"),
    ("cuda", KernelBackend("torch"), HOPPER, 256, "expert path 'torch'"),
    ("cuda", TRITON, HOPPER, 200, "intermediate size 200"),
])
def test_fp8_refusals_name_the_key_and_the_engine_reason(device, kernels, capability, intermediate, message):
    with pytest.raises(ConfigError, match=r"bench.expert_precision=fp8: .*" + message):
        expert_kernels("fp8", _spec(intermediate), kernels, device, capability=capability)


def test_random_fp8_experts_dequantise_to_the_asked_spread_in_half_the_bytes():
    experts_n, hidden, inter, std = 3, 384, 256, 0.02
    fp8 = LocalExperts(experts_n, hidden, inter, "silu", dtype=torch.bfloat16,
                       kernels=KernelBackend("triton", expert_weights="fp8"))
    fill_random_fp8(fp8, std, torch.Generator().manual_seed(0))
    bf16 = LocalExperts(experts_n, hidden, inter, "silu", dtype=torch.bfloat16, kernels=KernelBackend("torch"))
    assert fp8.gate_up_proj.dtype == torch.float8_e4m3fn
    for codes, scales, shape in ((fp8.gate_up_proj, fp8.gate_up_proj_scale_inv, (experts_n, 2 * inter, hidden)),
                                 (fp8.down_proj, fp8.down_proj_scale_inv, (experts_n, hidden, inter))):
        w = dequantize_blocks(codes, scales, (128, 128))
        assert w.shape == shape and torch.isfinite(w).all()
        assert w.std().item() == pytest.approx(std, rel=0.05)
        # every expert drawn apart (not one tensor repeated) and every block scaled to the e4m3 range
        assert not torch.equal(w[0], w[1])
        assert scales.min().item() > 0 and codes.float().abs().amax().item() == pytest.approx(448.0, rel=0.1)
    ratio = fp8.num_bytes / bf16.num_bytes
    assert 0.5 < ratio < 0.51, ratio  # codes are 1 byte to bf16's 2; one fp32 scale per 128x128 block
    assert precision_note(fp8).startswith("fp8 (e4m3, 128x128") and precision_note(bf16).startswith("bfloat16")
