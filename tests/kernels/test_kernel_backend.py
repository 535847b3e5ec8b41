"""Kernels are chosen once, when a model is built (server/kernels/backend.py), and held by the
modules: the environment is read then and never again, and the torch override still works."""
from __future__ import annotations

import pytest
import torch

from server.config import KernelConfig, ModelConfig
from server.kernels.backend import KernelBackend
from server.kernels.ops import KERNEL_OPS
from server.kernels.norm_rope import rms_norm_reference, rope_reference
from server.layers.attention import PagedAttentionMetadata
from server.model.loader import load_model
from server.moe.experts import KernelExpertPath, TorchExpertPath, UnsortedRowsExpertPath, expert_path
from server.moe.kernels.moe_reference import grouped_expert_mlp_grouped_mm, moe_grouped_mm
from server.moe.routing import build_policy
from server.registry import UnknownNameError
from tests.kernels.support.interpret import run_source_in_interpreter


def test_choice_by_device_and_environment(monkeypatch) -> None:
    monkeypatch.delenv("EPSERVE_KERNEL_BACKEND", raising=False)
    monkeypatch.delenv("EPSERVE_EXPERT_PATH", raising=False)
    assert KernelBackend.for_device("cpu") == KernelBackend("torch", "torch")
    assert KernelBackend.for_device(None).name == "torch"
    monkeypatch.setenv("EPSERVE_KERNEL_BACKEND", "grouped_mm")
    grouped = KernelBackend.for_device("cpu")
    assert grouped.op("fused_moe") is moe_grouped_mm and grouped.op("rms_norm") is rms_norm_reference  # MoE ops only
    monkeypatch.setenv("EPSERVE_EXPERT_PATH", "triton_unsorted")
    assert KernelBackend.for_device("cpu") == KernelBackend("grouped_mm", "triton_unsorted")
    monkeypatch.setenv("EPSERVE_KERNEL_BACKEND", "cutlass")
    with pytest.raises(UnknownNameError, match="unknown kernel backend 'cutlass' for EPSERVE_KERNEL_BACKEND; "
                                               "known kernel backends: grouped_mm, torch, triton"):
        KernelBackend.for_device("cpu")


def test_expert_paths_by_backend() -> None:
    assert isinstance(expert_path(KernelBackend("torch")), TorchExpertPath)
    path = expert_path(KernelBackend("grouped_mm"))
    assert type(path) is KernelExpertPath and path.grouped_expert_mlp is grouped_expert_mlp_grouped_mm
    assert isinstance(expert_path(KernelBackend("torch", "triton_unsorted")), UnsortedRowsExpertPath)


def test_model_holds_its_kernels_and_ignores_the_environment_after_build(monkeypatch) -> None:
    """Built on CPU: torch twins everywhere. An environment that would break any per-call
    lookup (an unknown backend) changes nothing once the model exists."""
    monkeypatch.delenv("EPSERVE_KERNEL_BACKEND", raising=False)
    model = load_model(ModelConfig(), policy=build_policy("natural"))
    assert model.kernels == KernelBackend("torch") and model.attention_backend is PagedAttentionMetadata
    layer = model.model.layers[0]
    assert layer.input_layernorm.rms_norm is rms_norm_reference and layer.self_attn.rope is rope_reference
    assert isinstance(layer.mlp.experts.path, TorchExpertPath)
    from tests.helpers.paged_driver import PagedDriver

    prompts = [(0, list(b"Hello")), (1, list(b"MoE layers"))]
    before = PagedDriver(model, num_blocks=8, block_size=16, seed=1).step(prompts)
    monkeypatch.setenv("EPSERVE_KERNEL_BACKEND", "cutlass")
    after = PagedDriver(model, num_blocks=8, block_size=16, seed=1).step(prompts)
    for sid, _ in prompts:
        assert torch.equal(before[sid], after[sid])


def test_unsorted_rows_path_matches_the_sorted_one_in_interpreter() -> None:
    """EPSERVE_EXPERT_PATH=triton_unsorted (expert_mlp_rows, no argsort or row copies) gives the
    grouped path's rows on the same dispatched inputs (bf16, rounding-level agreement)."""
    pytest.importorskip("triton")
    source = r"""
import torch
from server.kernels.backend import KernelBackend
from server.moe.experts import LocalExperts, expert_path
torch.manual_seed(0)
experts = LocalExperts(5, 64, 32, "silu", dtype=torch.bfloat16, kernels=KernelBackend("triton"))
with torch.no_grad():
    experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape) * 0.125)
    experts.down_proj.copy_(torch.randn(experts.down_proj.shape) * 0.18)
x = torch.randn(37, 64).bfloat16()
ids = torch.randint(0, 5, (37,))
def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
sorted_rows = expert_path(KernelBackend("triton")).rows(experts, x, ids)
unsorted = expert_path(KernelBackend("triton", "triton_unsorted")).rows(experts, x, ids)
torch_rows = expert_path(KernelBackend("torch")).rows(experts, x, ids)
err = rel(unsorted, sorted_rows)
assert err < 1e-2 and rel(unsorted, torch_rows) < 1e-2, (err, rel(unsorted, torch_rows))
assert expert_path(KernelBackend("triton", "triton_unsorted")).rows(experts, x[:0], ids[:0]).shape == (0, 64)
print("ok", err)
"""
    out = run_source_in_interpreter(source, timeout_s=300)
    assert out.strip().splitlines()[-1].startswith("ok")


def test_mla_decode_defaults_to_the_head_block_kernel(monkeypatch) -> None:
    """Models built for CUDA run the decode-only head-block kernel; the varlen kernel and the
    batched matmuls stay selectable (EPSERVE_MLA_DECODE) for comparison."""
    pytest.importorskip("triton")
    monkeypatch.delenv("EPSERVE_MLA_DECODE", raising=False)
    assert KernelBackend.for_device("cpu").mla_decode == "triton_decode" == KernelConfig().mla_decode
    ops = KERNEL_OPS["mla_decode"]
    assert ops["triton_decode"].__name__ == "mla_decode_headblock_triton"
    assert ops["triton"].__name__ == "mla_decode_triton" and ops["dense"].__name__ == "mla_decode_dense"
    monkeypatch.setenv("EPSERVE_MLA_DECODE", "triton")
    assert KernelBackend.for_device("cpu").mla_decode == "triton"
    with pytest.raises(UnknownNameError, match="triton_decode"):
        KernelBackend("triton", mla_decode="flash")


def test_mla_prefill_form_is_chosen_when_the_model_is_built(monkeypatch) -> None:
    """kernels.mla_prefill / EPSERVE_MLA_PREFILL: absorbed, expanded or auto (default), which takes
    the expanded form from EXPANDED_MIN_QUERIES_PER_KEY new tokens per cached key, up to
    EXPANDED_MAX_KEYS context keys in the step."""
    from server.kernels import mla_prefill_config as mpc

    monkeypatch.delenv("EPSERVE_MLA_PREFILL", raising=False)
    assert KernelBackend.for_device("cpu").mla_prefill == "auto" == KernelConfig().mla_prefill
    monkeypatch.setenv("EPSERVE_MLA_PREFILL", "expanded")
    assert KernelBackend.for_device("cpu").mla_prefill == "expanded"
    assert KernelBackend.for_device("cpu", KernelConfig(mla_prefill="absorbed")).mla_prefill == "absorbed"
    with pytest.raises(UnknownNameError, match="absorbed, auto, expanded"):
        KernelBackend("triton", mla_prefill="flash")
    auto, limit, most = mpc.MLA_PREFILL_MODES["auto"], mpc.EXPANDED_MIN_QUERIES_PER_KEY, mpc.EXPANDED_MAX_KEYS
    assert not auto(limit - 1, 4096) and auto(limit, 4096) and auto(limit, most) and not auto(limit, most + 1)
    assert not mpc.MLA_PREFILL_MODES["absorbed"](1e9, 10) and mpc.MLA_PREFILL_MODES["expanded"](1.0, 10**6)
    assert KERNEL_OPS["mla_prefill_expanded"]["torch"].__name__ == "mla_prefill_expanded_reference"
    assert "triton" in KERNEL_OPS["mla_prefill_expanded"]


def test_queries_per_key_weights_sequences_by_context() -> None:
    pytest.importorskip("triton")
    from server.layers.attention_triton import queries_per_key

    assert queries_per_key([4096], [4096]) == 4096  # one whole prompt: its length
    assert queries_per_key([64], [8192]) == 64  # a short chunk over a long prefix
    assert queries_per_key([1000, 1, 1], [1000, 3000, 4000]) == pytest.approx((1000 * 1000 + 7000) / 8000)
    assert queries_per_key([], []) == 0.0
