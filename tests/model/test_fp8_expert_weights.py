"""Experts kept as FP8 blocks (server/model/expert_format.py): when the loader chooses them,
and what they hold once loaded: the checkpoint's e4m3 codes and block scales, which dequantise
to exactly the values the dequantising path loads."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from server.config import ModelConfig
from server.kernels.backend import KernelBackend
from server.model.expert_format import expert_weight_format
from server.kernels.fp8_blocks import dequantize_blocks
from server.layers.fp8_linear import Fp8Linear
from server.model.loader import load_model, read_model_spec
from server.model.spec import ModelLoadError
from server.moe.routing import build_policy
from tests.helpers.fp8_checkpoint import write_fp8_checkpoint
from tests.helpers.hf_models import build_hf_model, save_fused_layout, save_hf_model

SIZES = dict(hidden_size=160, intermediate_size=136, moe_intermediate_size=128)


@pytest.fixture(scope="module")
def fp8_folders(tmp_path_factory):
    """{"per_expert": folder, "fused": folder}: one random Qwen3-MoE in both expert layouts, FP8."""
    root = tmp_path_factory.mktemp("fp8x")
    hf = build_hf_model("qwen3_moe", seed=4, **SIZES)
    hf.config.architectures = [type(hf).__name__]
    save_hf_model(hf, root / "per_expert_values")
    save_fused_layout(hf, root / "fused_values")
    for layout in ("per_expert", "fused"):
        write_fp8_checkpoint(root / f"{layout}_values", root / layout)
    return {"per_expert": root / "per_expert", "fused": root / "fused"}


def test_fp8_experts_only_where_every_condition_holds(fp8_folders) -> None:
    spec = read_model_spec(ModelConfig(path=str(fp8_folders["fused"])))
    triton, h100 = KernelBackend("triton"), (9, 0)
    assert expert_weight_format(spec, "auto", triton, "cuda", h100)[0] == "fp8"
    assert expert_weight_format(spec, "auto", KernelBackend("triton", "triton_unsorted"), "cuda:1", (8, 9))[0] == "fp8"
    values = [
        (spec, "dequantize", triton, "cuda", h100),
        (spec, "auto", triton, "cpu", None),
        (spec, "auto", triton, "cuda", (8, 0)),  # A100: no e4m3 tensor cores
        (spec, "auto", KernelBackend("torch"), "cuda", h100),
        (spec, "auto", KernelBackend("grouped_mm"), "cuda", h100),
        (replace(spec, moe_intermediate_size=136), "auto", triton, "cuda", h100),
        (replace(spec, quantization=replace(spec.quantization, block=(64, 64))), "auto", triton, "cuda", h100),
        (replace(spec, quantization=None), "auto", triton, "cuda", h100),
    ]
    for args in values:
        fmt, why = expert_weight_format(*args)
        assert fmt == "values" and why, args[1:]


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_fp8_experts_hold_the_checkpoint_codes(fp8_folders, layout) -> None:
    cfg = ModelConfig(path=str(fp8_folders[layout]), dtype="float32")
    fp8 = load_model(cfg, policy=build_policy("natural"), kernels=KernelBackend("torch", expert_weights="fp8"))
    ref = load_model(cfg, policy=build_policy("natural"))  # CPU: dequantised on load
    for a, b in zip(fp8.moe_experts(), ref.moe_experts()):
        assert a.weight_format == "fp8" and b.weight_format == "values"
        assert a.gate_up_proj.dtype == a.down_proj.dtype == torch.float8_e4m3fn
        assert a.path.name.endswith("_fp8")
        assert a.act_dtype == b.act_dtype == b.gate_up_proj.dtype == torch.float32  # what warm-up rows are made of
        for codes, scales, values in ((a.gate_up_proj, a.gate_up_proj_scale_inv, b.gate_up_proj),
                                      (a.down_proj, a.down_proj_scale_inv, b.down_proj)):
            assert torch.equal(dequantize_blocks(codes, scales, (128, 128)), values)
        assert a.num_bytes < b.num_bytes / 3  # 1-byte codes (+ scales) against float32 values
    fp8_plain = {n: p for n, p in fp8.named_parameters() if ".experts." not in n}
    ref_plain = {n: p for n, p in ref.named_parameters() if ".experts." not in n}
    dense = {n: m for n, m in fp8.named_modules() if isinstance(m, Fp8Linear)}  # FP8-stored dense linears stay e4m3 too
    assert dense and fp8_plain.keys() == ref_plain.keys() - {f"{n}.weight" for n in dense}
    assert all(torch.equal(fp8_plain[n], ref_plain[n]) for n in fp8_plain)
    for n, layer in dense.items():
        assert torch.equal(dequantize_blocks(layer.weight_codes, layer.weight_scale_inv, (128, 128)), ref_plain[f"{n}.weight"])


def test_fp8_experts_refuse_the_torch_forward(fp8_folders) -> None:
    cfg = ModelConfig(path=str(fp8_folders["fused"]))
    model = load_model(cfg, policy=build_policy("natural"), kernels=KernelBackend("torch", expert_weights="fp8"))
    experts = model.moe_experts()[0]
    with pytest.raises(RuntimeError, match="FP8 experts run through their path"):
        experts(torch.zeros(2, experts.hidden, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.long))


def test_fp8_experts_need_fp8_expert_tensors(fp8_folders, tmp_path) -> None:
    """Experts the checkpoint keeps as values (modules_to_not_convert) cannot be held as FP8
    blocks: the load names the tensor and the setting that loads it; a values checkpoint too."""
    write_fp8_checkpoint(fp8_folders["fused"].parent / "fused_values", tmp_path / "kept", keep=("model.layers.0.mlp.experts",))
    fp8 = KernelBackend("torch", expert_weights="fp8")
    with pytest.raises(ModelLoadError, match=r"experts.gate_up_proj' .* not F8_E4M3.*model.quantization=dequantize"):
        load_model(ModelConfig(path=str(tmp_path / "kept")), policy=build_policy("natural"), kernels=fp8)
    with pytest.raises(ModelLoadError, match="need an FP8 block-quantised checkpoint"):
        load_model(ModelConfig(path=str(fp8_folders["fused"].parent / "fused_values")), policy=build_policy("natural"),
                   kernels=fp8)
