"""Public entry points: model spec, model and tokenizer from a ModelConfig.

Where the weights come from:
  model.path set           a local Hugging Face folder (config.json + safetensors + tokenizer)
  model.shape set          random weights of that config.json-style shape (benchmarks), seeded by model.seed
  neither, name == "tiny"  the embedded tiny Qwen3-MoE model in server/assets/tiny (scripts/tiny_model/)
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import ModelConfig, thaw
from ..kernels.backend import KernelBackend
from ..moe.dispatch import DispatchSettings
from ..moe.eplb.rebalance import ExpertRebalancer
from ..moe.eplb.settings import EplbSettings
from ..moe.routing import RoutingPolicy
from .causal_lm import MoECausalLM
from .checkpoint import weight_files
from .expert_format import expert_weight_format
from .fp8_reader import open_checkpoint
from .families import get_family
from .random_weights import RANDOM_FP8_CONFIG, init_random_weights
from .spec import ModelLoadError, ModelSpec
from .weights import load_checkpoint_weights

log = logging.getLogger(__name__)
TINY_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def model_folder(model_cfg: ModelConfig) -> Path | None:
    """The HF folder to read, or None for a random-weight `shape` model."""
    if model_cfg.path:
        folder = Path(model_cfg.path).expanduser()
        if not folder.exists():
            raise ModelLoadError(f"model.path={model_cfg.path!r}: folder does not exist")
        if not folder.is_dir():
            raise ModelLoadError(f"model.path={model_cfg.path!r} is not a folder (expected a Hugging Face model folder)")
        return folder
    if model_cfg.shape is not None:
        return None
    if model_cfg.name == "tiny":
        if not (TINY_MODEL_DIR / "config.json").is_file():
            raise ModelLoadError(f"the embedded tiny model is missing from {TINY_MODEL_DIR}; reinstall epserve (a source checkout rebuilds it with python -m scripts.tiny_model.build, then .train)")
        return TINY_MODEL_DIR
    raise ModelLoadError(
        f"model.name={model_cfg.name!r} has no model.path: set model.path to a local Hugging Face folder, "
        "model.shape to a config.json-style mapping (random weights), or use model.name=tiny"
    )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path.parent}: {what} {path.name} is missing")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _generation_eos(folder: Path) -> tuple[int, ...]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return ()
    value = _read_json(path, "generation config").get("eos_token_id")
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


def spec_from_config(cfg: Mapping[str, Any], *, dtype: str = "auto", source: str = "config.json",
                     extra_eos: tuple[int, ...] = (), quantization: str = "auto") -> ModelSpec:
    archs = cfg.get("architectures")
    if not archs or not isinstance(archs, (list, tuple)) or not isinstance(archs[0], str):
        raise ModelLoadError(f"{source}: 'architectures' must name the model class, e.g. [\"Qwen3MoeForCausalLM\"]")
    family = get_family(archs[0])
    return family.parse(cfg, architecture=archs[0], dtype=dtype, source=source, extra_eos=extra_eos,
                        quantization=quantization)


def read_model_spec(model_cfg: ModelConfig) -> ModelSpec:
    """The model's shape from config.json (or model.shape) alone: cheap, no weights read."""
    folder = model_folder(model_cfg)
    if folder is None:
        shape = thaw(model_cfg.shape)
        if not isinstance(shape, dict):
            raise ModelLoadError(f"model.shape must be a mapping (config.json-style), got {type(shape).__name__}")
        dtype = model_cfg.dtype
        if dtype == "auto" and not (shape.get("dtype") or shape.get("torch_dtype")):
            dtype = "bfloat16"  # what real checkpoints of these families ship in
        quantization = model_cfg.quantization
        if quantization == "fp8":  # random weights drawn as an FP8 block checkpoint stores them
            shape = {**shape, "quantization_config": RANDOM_FP8_CONFIG}
            quantization = "auto"
        return spec_from_config(shape, dtype=dtype, source="model.shape", quantization=quantization)
    cfg = _read_json(folder / "config.json", "model config")
    return spec_from_config(cfg, dtype=model_cfg.dtype, source=str(folder / "config.json"),
                            extra_eos=_generation_eos(folder), quantization=model_cfg.quantization)


def load_model(model_cfg: ModelConfig, *, policy: RoutingPolicy, ep_rank: int = 0, ep_size: int = 1,
               ep_group=None, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               eplb: EplbSettings | None = None, dispatch: DispatchSettings | None = None,
               spec: ModelSpec | None = None, kernels: KernelBackend | None = None) -> MoECausalLM:
    """Build this rank's shard: all non-expert weights, experts [r*E/ep, (r+1)*E/ep) — or with
    `eplb` the experts of this rank's slots in the start-up placement (from eplb's stats file).

    `dtype` overrides model.dtype. With ep_size > 1, `ep_group` is the EP process group
    (None: the default group, as under torchrun). `dispatch` (parallel.dispatch): how tokens
    reach other ranks' experts (None: auto). `spec`: the model's spec as the launch plan read it
    (None: read now). `kernels`: which kernels it runs (None: by device and environment)."""
    spec = spec if spec is not None else read_model_spec(model_cfg)
    if dtype is not None:
        if dtype not in _DTYPE_NAMES:
            raise ModelLoadError(f"dtype {dtype} cannot be served; use one of {list(_DTYPE_NAMES)}")
        spec = replace(spec, dtype=_DTYPE_NAMES[dtype])
    spec.check_ep_size(ep_size)
    torch_dtype = getattr(torch, spec.dtype)
    kernels = kernels or KernelBackend.for_device(device)
    why = f"expert weights {kernels.expert_weights}, as the caller chose"
    if kernels.expert_weights == "values":  # a caller's explicit "fp8" (tests, tools) is kept
        fmt, why = expert_weight_format(spec, model_cfg.quantization, kernels, device)
        kernels = replace(kernels, expert_weights=fmt)
    elif spec.quantization is None:
        raise ModelLoadError("FP8 expert weights need an FP8 block-quantised checkpoint")
    placement = None if eplb is None else eplb.initial_placement(spec.num_moe_layers, spec.num_experts, ep_size)
    model = MoECausalLM(spec, policy=policy, ep_rank=ep_rank, ep_size=ep_size, ep_group=ep_group,
                        dtype=torch_dtype, device=device, placement=placement, dispatch=dispatch, kernels=kernels)
    folder = model_folder(model_cfg)
    if folder is None:
        init_random_weights(model, model_cfg.seed)
    else:
        if spec.quantization is not None and ep_rank == 0 and kernels.expert_weights == "fp8":
            log.info("%s: FP8 block-quantised weights (%dx%d blocks): routed experts and the FP8-stored dense linears "
                     "stay e4m3 with their block scales (%s); the rest is dequantised to %s as it loads "
                     "(model.quantization=%s)", folder, *spec.quantization.block, why, spec.dtype, model_cfg.quantization)
        elif spec.quantization is not None and ep_rank == 0:
            log.info("%s: FP8 block-quantised weights (%dx%d blocks) are dequantised to %s as they load "
                     "(model.quantization=%s%s)", folder, *spec.quantization.block, spec.dtype, model_cfg.quantization,
                     f": {why}" if model_cfg.quantization == "auto" else "")
        with open_checkpoint(folder, spec.quantization) as reader:
            load_checkpoint_weights(model, reader, progress=ep_rank == 0, dense_fp8=kernels.expert_weights == "fp8")
    if eplb is not None:
        model.eplb = ExpertRebalancer(model, eplb)
    return model.eval()


def check_model_files(model_cfg: ModelConfig) -> None:
    """Fail now, naming what is missing, if the model folder lacks weights or tokenizer files:
    start-up runs this before anything listens or spawns, so a bad folder is a configuration
    error in a second rather than a failure once the port is open."""
    folder = model_folder(model_cfg)
    if folder is not None:
        weight_files(folder)
        scheme = read_model_spec(model_cfg).quantization
        if scheme is not None:  # every FP8 tensor's scales, from the headers
            with open_checkpoint(folder, scheme) as reader:
                reader.check_scales()
    _tokenizer_folder(model_cfg)


def _tokenizer_folder(model_cfg: ModelConfig) -> Path:
    folder = model_folder(model_cfg) or TINY_MODEL_DIR
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelLoadError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return folder


def load_tokenizer(model_cfg: ModelConfig):
    """The HF tokenizer of the model folder (a `shape` model borrows the embedded byte-level one)."""
    from transformers import AutoTokenizer  # heavy import, only where a tokenizer is needed

    folder = _tokenizer_folder(model_cfg)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer: {exc}") from exc
