"""FP8 block checkpoints that cannot be served, and the model.quantization setting.

A malformed checkpoint stops start-up naming the tensor (check_before_listening reads only the
headers), and load_model, which ranks run, names it too. Quantisation configs epserve cannot
read are refused from config.json alone, naming the key."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.config import AppConfig, ConfigError, ModelConfig
from server.model.loader import load_model, spec_from_config
from server.model.spec import ModelLoadError
from server.moe.routing import build_policy
from server.startup_checks import check_before_listening
from tests.helpers.fp8_checkpoint import quantize_blocks, write_fp8_checkpoint
from tests.helpers.hf_models import build_hf_model, save_hf_model

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # [32, 32]: one partial 128 x 128 block
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
QWEN = {"architectures": ["Qwen3MoeForCausalLM"]}


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fp8")
    save_hf_model(build_hf_model("qwen3_moe", seed=3), root / "values")
    write_fp8_checkpoint(root / "values", root / "fp8")
    return root / "fp8"


def _edit(src: Path, dst: Path, edit, config_edit=None) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config_edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _load(folder: Path, quantization: str = "auto"):
    return load_model(ModelConfig(path=str(folder), quantization=quantization), policy=build_policy("natural"))


def _startup(folder: Path) -> None:
    check_before_listening(AppConfig.from_dict({"model": {"path": str(folder)}}))


def _requantize(block):
    def edit(tensors):
        codes, scales = quantize_blocks(tensors[Q_PROJ].float(), block)
        tensors[Q_PROJ], tensors[Q_PROJ + "_scale_inv"] = codes, scales
    return edit


MALFORMED = {
    "missing_scale": (lambda t: t.pop(Q_PROJ + "_scale_inv"), None,
                      rf"tensor '{Q_PROJ}' .*F8_E4M3 but its block scales '{Q_PROJ}_scale_inv' are missing"),
    "wrong_block_size": (_requantize((16, 16)), None,
                         rf"tensor '{Q_PROJ}_scale_inv' .*shape \[2, 2\].*blocks of \[128, 128\] needs \[1, 1\]; "
                         r"they fit weight_block_size \[16, 16\]"),
    "wrong_scale_shape": (lambda t: t.update({Q_PROJ + "_scale_inv": torch.ones(1)}), None,
                          rf"tensor '{Q_PROJ}_scale_inv' .*shape \[1\]; weight '{Q_PROJ}' of shape \[32, 32\].*needs \[1, 1\]$"),
    "kept_but_fp8": (lambda t: None, lambda q: q.update(modules_to_not_convert=["self_attn.q_proj"]),
                     rf"tensor '{Q_PROJ}' .*modules_to_not_convert \('self_attn.q_proj'\).*kept unquantised"),
    "fp8_scale": (lambda t: t.update({Q_PROJ + "_scale_inv": t[Q_PROJ + "_scale_inv"].to(torch.float8_e4m3fn)}), None,
                  rf"tensor '{Q_PROJ}_scale_inv' .*stored as F8_E4M3; block scales must be"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_is_refused_naming_the_tensor(case, fp8_folder, tmp_path):
    edit, config_edit, match = MALFORMED[case]
    bad = _edit(fp8_folder, tmp_path / case, edit, config_edit)
    with pytest.raises(ConfigError, match=match):  # at start-up, from the headers
        _startup(bad)
    with pytest.raises(ModelLoadError, match=match):  # and where a rank loads it
        _load(bad)


def test_auto_and_dequantize_load_it_none_refuses_it(fp8_folder, caplog):
    with caplog.at_level("INFO", logger="server.model.loader"):
        auto = _load(fp8_folder)
    notes = [r.getMessage() for r in caplog.records if "dequantised" in r.getMessage()]
    assert len(notes) == 1 and "model.quantization=auto" in notes[0]
    explicit = _load(fp8_folder, "dequantize")
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), explicit.state_dict().values()))
    with pytest.raises(ModelLoadError, match=r"FP8 block-quantised \(weight_block_size=\[128, 128\]\)\) and "
                                             r"model.quantization=none.*set model.quantization=auto"):
        _load(fp8_folder, "none")


def test_a_bad_quantization_setting_names_the_key():
    with pytest.raises(ConfigError, match=r"model.quantization='int4' is not one of \('auto', 'none', 'dequantize', 'fp8'\)"):
        AppConfig.from_dict({"model": {"quantization": "int4"}})
    # fp8 draws random FP8 weights for a model.shape; the embedded model has a checkpoint
    with pytest.raises(ConfigError, match=r"model.quantization=fp8 draws random FP8 block weights for a model.shape"):
        AppConfig.from_dict({"model": {"quantization": "fp8"}})


@pytest.mark.parametrize("quant,match", [
    ({**FP8, "weight_block_size": [128]}, r"quantization_config.weight_block_size must be two positive integers"),
    ({**FP8, "weight_block_size": [128, 0]}, r"weight_block_size must be two positive integers .*got \[128, 0\]"),
    ({**FP8, "activation_scheme": "static"}, r"activation_scheme='static' is not supported"),
    ({**FP8, "fmt": "e5m2"}, r"fmt='e5m2' is not supported"),
    ({**FP8, "modules_to_not_convert": "lm_head"}, r"modules_to_not_convert must be a list of module names"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, r"quant_method='fp8', per-tensor scales"),
    ({"quant_method": "awq", "bits": 4}, r"quant_method='awq'\); epserve serves bf16/fp16/fp32 weights and FP8 block"),
])
def test_quantization_configs_it_cannot_read_are_refused(quant, match):
    with pytest.raises(ModelLoadError, match=match):
        spec_from_config({**QWEN, "quantization_config": quant})


def test_the_spec_carries_the_block_scheme():
    spec = spec_from_config({**QWEN, "quantization_config": {**FP8, "modules_to_not_convert": ["lm_head", "mlp.gate"]}})
    assert spec.quantization.block == (128, 128)
    assert spec.quantization.keeps_unquantised("model.layers.3.mlp.gate") == "mlp.gate"
    assert spec.quantization.keeps_unquantised("model.layers.3.mlp.experts.1.gate_proj") is None
    assert spec_from_config(QWEN).quantization is None


def test_the_launch_plan_says_the_weights_are_dequantised(fp8_folder):
    from server.launch_plan import build_launch_plan

    plan = build_launch_plan(AppConfig.from_dict({"model": {"path": str(fp8_folder)}}))
    assert ("top-2, FP8 128x128 blocks dequantised to float32 on load, routed experts and FP8-stored dense linears "
            "kept FP8 where the FP8 kernels run (CUDA, Triton experts))") in plan.describe()
    plan = build_launch_plan(AppConfig.from_dict({"model": {"path": str(fp8_folder), "quantization": "dequantize"}}))
    assert "top-2, FP8 128x128 blocks dequantised to float32 on load)" in plan.describe()
