"""The FP8 block reader on the fused expert layout ([E, rows, cols] codes with [E, ...] scales):
a run of experts is read, and counted, as those rows only; a checkpoint in that layout loads
to the same parameters as its dequantised values."""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from server.config import ModelConfig
from server.model.fp8_reader import Fp8BlockReader
from server.model.loader import load_model
from server.model.spec import Fp8BlockScheme
from server.moe.routing import build_policy
from tests.helpers.fp8_checkpoint import BLOCK, dequantize_reference, quantize_blocks, write_fp8_checkpoint
from tests.helpers.hf_models import build_hf_model, save_fused_layout

FUSED = "model.layers.0.mlp.experts.gate_up_proj"


def test_a_run_of_experts_reads_only_its_rows(tmp_path):
    torch.manual_seed(0)
    weights = torch.randn(4, 200, 136)  # [E, 2I, H]: 2 x 2 blocks per expert, partial at the edges
    pairs = [quantize_blocks(w) for w in weights]
    codes, scales = torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])  # [4, 200, 136], [4, 2, 2]
    norm = torch.rand(136, dtype=torch.bfloat16)
    save_file({FUSED: codes, FUSED + "_scale_inv": scales, "model.norm.weight": norm}, str(tmp_path / "model.safetensors"))
    with Fp8BlockReader(tmp_path, Fp8BlockScheme(block=BLOCK)) as reader:
        assert reader.check_scales() == 1
        rows = reader.read_rows(FUSED, 1, 3, (200, 136), 4)  # experts 1 and 2
        assert reader.bytes_read["expert"] == 2 * 200 * 136 + 2 * 2 * 2 * 4  # their codes and scales only
        assert torch.equal(reader.read("model.norm.weight"), norm)  # values pass through unchanged
        assert reader.consumed == {FUSED, FUSED + "_scale_inv", "model.norm.weight"}
    assert rows.dtype == torch.float32
    for i, e in enumerate((1, 2)):
        assert torch.equal(rows[i], dequantize_reference(codes[e], scales[e]))


def test_fused_fp8_checkpoint_loads_as_its_dequantised_values(tmp_path):
    hf = build_hf_model("qwen3_moe", seed=5, hidden_size=160, intermediate_size=136, moe_intermediate_size=144)
    hf.config.architectures = [type(hf).__name__]  # save_pretrained would set it; save_fused_layout does not
    save_fused_layout(hf, tmp_path / "values")
    values = write_fp8_checkpoint(tmp_path / "values", tmp_path / "fp8")
    assert FUSED in values and values[FUSED].shape == (8, 288, 160)
    dequantised = tmp_path / "dequantised"  # the same model, stored as float32 values
    save_fused_layout(hf, dequantised)
    tensors = load_file(str(dequantised / "model.safetensors"))
    save_file({**tensors, **values}, str(dequantised / "model.safetensors"), metadata={"format": "pt"})
    fp8 = load_model(ModelConfig(path=str(tmp_path / "fp8")), policy=build_policy("natural"))
    ref = load_model(ModelConfig(path=str(dequantised)), policy=build_policy("natural"))
    assert torch.equal(fp8.model.layers[0].mlp.experts.gate_up_proj, values[FUSED])
    for (name, p), (_, q) in zip(fp8.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name  # the same model, so the same logits
