"""A test-side FP8 block quantiser: turns a saved tiny transformers checkpoint into the layout
DeepSeek-V3/R1, Kimi-K2 and Qwen3-FP8 ship (e4m3 codes, a float32 `<name>_scale_inv` per
block, quantization_config in config.json), plus the reference the server is held to: the
same checkpoint dequantised to float32 and loaded by transformers.

Written here, loop by loop over blocks, rather than with the server's fp8_blocks.py, so a
mistake in the server's block indexing cannot hide behind the same mistake in the reference.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
BLOCK = (128, 128)
_NEVER = ("model.embed_tokens.weight", "lm_head.weight")  # FP8 checkpoints keep these as values


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [rows, cols] -> (codes [rows, cols] e4m3, scale_inv [ceil(rows/b0), ceil(cols/b1)] f32):
    each block scaled so its largest magnitude lands on FP8_MAX, as DeepSeek's quantiser does."""
    rows, cols = weight.shape
    scales = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]), dtype=torch.float32)
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = weight[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].float()
            scale = tile.abs().max().item() / FP8_MAX or 1.0
            scales[i, j] = scale
            codes[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (tile / scale).to(torch.float8_e4m3fn)
    return codes, scales


def dequantize_reference(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] = BLOCK) -> torch.Tensor:
    """The float32 values a block checkpoint stands for, one block at a time."""
    out = codes.to(torch.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            out[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= scales[i, j]
    return out


def is_quantised(name: str, tensor: torch.Tensor, keep: tuple[str, ...]) -> bool:
    """Linear weights only (and fused [E, rows, cols] expert tensors): not norms, biases,
    embeddings, the head or the router gate, nor a module modules_to_not_convert names
    (transformers' rule: regex at the start, or a suffix)."""
    module = name.removesuffix(".weight")
    linear = tensor.dim() == 2 and name.endswith(".weight") and name not in _NEVER and not name.endswith(".mlp.gate.weight")
    fused = tensor.dim() == 3 and name.endswith(("experts.gate_up_proj", "experts.down_proj"))
    return (linear or fused) and not any(re.match(p, module) or module.endswith(p) for p in keep)


def _quantize_any(tensor: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] or [E, rows, cols] (one scale grid per expert)."""
    if tensor.dim() == 2:
        return quantize_blocks(tensor, block)
    pairs = [quantize_blocks(t, block) for t in tensor]
    return torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])


def _dequantize_any(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    if codes.dim() == 2:
        return dequantize_reference(codes, scales, block)
    return torch.stack([dequantize_reference(c, s, block) for c, s in zip(codes, scales)])


def write_fp8_checkpoint(src: Path, dst: Path, keep: tuple[str, ...] = (), block: tuple[int, int] = BLOCK) -> dict:
    """src (saved HF folder, values) -> dst (FP8 block checkpoint); returns {name: dequantised f32}
    for every tensor it quantised."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(BLOCK), **({"modules_to_not_convert": list(keep)} if keep else {})}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors, out, values = load_file(str(src / "model.safetensors")), {}, {}
    for name, tensor in tensors.items():
        if is_quantised(name, tensor, keep):
            codes, scales = _quantize_any(tensor, block)
            out[name], out[name + "_scale_inv"] = codes, scales
            values[name] = _dequantize_any(codes, scales, block)
        else:
            out[name] = tensor
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return values


def dequantized_hf_model(src: Path, values: dict, dst: Path):
    """transformers' model of src with the quantised tensors replaced by their dequantised values:
    the float32 reference an FP8 checkpoint's logits are compared with."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    tensors.update(values)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager", experts_implementation="eager",
                                                 dtype=torch.float32)
    return model.eval()
