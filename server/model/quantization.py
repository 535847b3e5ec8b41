"""config.json's quantization_config, read against the model.quantization setting.

Weights are served as bf16/fp16/fp32 values. FP8 block-quantised checkpoints (DeepSeek-V3/R1,
Kimi-K2, Qwen3-FP8: e4m3 codes plus a float32 weight_scale_inv per 128x128 block) are the one
quantised format epserve reads. Non-expert weights are dequantised to the serving dtype as they
load (server/model/fp8_reader.py); routed experts too, except on CUDA under auto, where they
keep their e4m3 codes and block scales for the block-FP8 MoE kernels (server/model/expert_format.py
says exactly when). Every other
quantisation (AWQ, GPTQ, per-tensor FP8, ...) stores something a value read would turn into
garbage, so it stops here, as does FP8 under model.quantization=none.

  auto        follow config.json: an FP8 block checkpoint is dequantised on load, its routed
              experts excepted where the FP8 MoE kernels run them (expert_format.py)
  none        refuse any quantised checkpoint (the behaviour before FP8 support)
  dequantize  dequantise FP8 block checkpoints on load, whatever the device could run
  fp8         model.shape only (random weights): draw them as an FP8 block checkpoint stores
              them (128x128 blocks), then serve them as auto serves such a checkpoint
              (server/model/random_weights.py), so a benchmark runs the precision users deploy
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from .spec import Fp8BlockScheme, ModelLoadError

_OFFLINE = ("Dequantise it to bf16 first (for DeepSeek-V3 FP8 checkpoints, DeepSeek's fp8_cast_bf16.py) and "
            "drop quantization_config from config.json")


def quantization_scheme(cfg: Mapping[str, Any], mode: str, source: str) -> Fp8BlockScheme | None:
    """config.json dict + model.quantization -> the FP8 block scheme to load with, None for an
    unquantised checkpoint, or ModelLoadError saying why this checkpoint cannot be served."""
    quant = cfg.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, Mapping):
        raise ModelLoadError(f"{source}: quantization_config must be a mapping, got {quant!r}")
    method = quant.get("quant_method", "?")
    block = quant.get("weight_block_size")
    if method != "fp8" or block is None:
        what = f"quant_method={method!r}" + (", per-tensor scales (no weight_block_size)" if method == "fp8" else "")
        raise ModelLoadError(
            f"{source}: the checkpoint is quantised ({what}); epserve serves bf16/fp16/fp32 weights and "
            f"FP8 block-quantised ones (quant_method fp8 with weight_block_size) only. {_OFFLINE}")
    if mode == "none":
        raise ModelLoadError(
            f"{source}: the checkpoint is quantised (FP8 block-quantised (weight_block_size={list(block)})) and "
            "model.quantization=none serves bf16/fp16/fp32 weights only; set model.quantization=auto (or dequantize) "
            f"to dequantise it to the serving dtype on load, or: {_OFFLINE}")
    return Fp8BlockScheme(block=_block_size(block, source), modules_to_not_convert=_kept_modules(quant, source))


def _block_size(block: Any, source: str) -> tuple[int, int]:
    ok = (isinstance(block, (list, tuple)) and len(block) == 2
          and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block))
    if not ok:
        raise ModelLoadError(f"{source}: quantization_config.weight_block_size must be two positive integers "
                             f"(rows, columns of one scale block), got {block!r}")
    return int(block[0]), int(block[1])


def _kept_modules(quant: Mapping[str, Any], source: str) -> tuple[str, ...]:
    """modules_to_not_convert, checked: activation scales and other FP8 formats are refused too,
    since a dequantised load would ignore them silently."""
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ModelLoadError(f"{source}: quantization_config.activation_scheme={scheme!r} is not supported "
                             "(FP8 block checkpoints quantise activations dynamically: 'dynamic')")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ModelLoadError(f"{source}: quantization_config.fmt={fmt!r} is not supported (only 'e4m3')")
    kept = quant.get("modules_to_not_convert") or ()
    if not isinstance(kept, (list, tuple)) or not all(isinstance(k, str) and k for k in kept):
        raise ModelLoadError(f"{source}: quantization_config.modules_to_not_convert must be a list of module names, "
                             f"got {kept!r}")
    for pattern in kept:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ModelLoadError(f"{source}: quantization_config.modules_to_not_convert has {pattern!r}, "
                                 f"which is not a valid pattern ({exc})") from None
    return tuple(kept)
