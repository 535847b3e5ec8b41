"""The baseline: Hugging Face transformers on the same weights, same GPU, same workload.

The transformers model is built from the served model's own config (the checkpoint folder's
config.json, or `model.shape`), with transformers' default attention (sdpa) and experts
(grouped_mm where torch has it) implementations, and shares our weight tensors (module names
mirror transformers', so the state dicts match key for key). It generates greedily
with its own `generate`: a static KV cache by default (`bench.hf_cache`), its auto-compile
off unless `bench.hf_compile` (compiling takes minutes), EOS suppressed so every sequence
makes exactly O tokens. Prefill is timed as generate(max_new_tokens=1); decode as the full
generate minus that, over O-1 tokens per sequence: the same split as ours.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..config import thaw
from ..model.loader import model_folder
from .generate import synchronize


def hf_config(model_cfg, spec):
    from transformers import AutoConfig

    folder = model_folder(model_cfg)
    if folder is not None:
        return AutoConfig.from_pretrained(str(folder))
    shape = {k: v for k, v in thaw(model_cfg.shape).items() if k not in ("model_type",)}
    return AutoConfig.for_model(spec.model_type, **shape)


def build_hf_model(model_cfg, ours, experts: str | None = None) -> Any:
    """transformers model on our device and dtype, holding our very weight tensors (built on the
    meta device, then our state dict assigned): no second copy, so a shape whose weights fill
    most of the GPU (DeepSeek-V3 at 4 layers: ~74 GB) still gets its baseline in the same run.
    Neither model writes its weights while generating. `experts` picks transformers'
    experts_implementation (its default gathers each token's expert weights for small batches,
    which for DeepSeek-V3's 256 experts asks for more memory than the GPU has left)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(model_cfg, ours.spec)
    with torch.device("meta"):
        extra = {"experts_implementation": experts} if experts else {}
        hf = AutoModelForCausalLM.from_config(cfg, dtype=ours.dtype, **extra)
    result = hf.load_state_dict(ours.state_dict(), strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and ours.spec.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"transformers model and ours disagree on weights: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    if ours.spec.tie_word_embeddings:
        hf.tie_weights()
    _rebuild_meta_modules(hf, ours.device)
    return hf.eval()


def _rebuild_meta_modules(hf, device: torch.device) -> None:
    """Modules whose buffers are not in the state dict (rotary embeddings' inv_freq) are still on
    the meta device: build them again from the config on `device`."""
    for name, module in list(hf.named_modules()):
        if not name or not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = hf.get_submodule(parent_name) if parent_name else hf
        try:
            with torch.device(device):
                setattr(parent, attr, type(module)(config=hf.config))
        except TypeError as exc:
            raise RuntimeError(f"transformers module {name} ({type(module).__name__}) has buffers outside the state "
                               f"dict and cannot be rebuilt from the config: {exc}") from exc
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers model still has tensors without data: {left[:5]}")


def _generation_config(new_tokens: int, cache: str, compile_: bool, pad: int):
    from transformers import GenerationConfig

    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
              disable_compile=not compile_)
    if cache == "static":
        kw["cache_implementation"] = "static"
    return GenerationConfig(**kw)


@torch.inference_mode()
def _timed_generate(hf, prompts: torch.Tensor, new_tokens: int, cache: str, compile_: bool) -> tuple[float, torch.Tensor]:
    mask = torch.ones_like(prompts)
    gen = _generation_config(new_tokens, cache, compile_, pad=0)
    synchronize(prompts.device)
    t0 = time.perf_counter()
    out = hf.generate(input_ids=prompts, attention_mask=mask, generation_config=gen)
    synchronize(prompts.device)
    elapsed = time.perf_counter() - t0
    if out.shape != (prompts.shape[0], prompts.shape[1] + new_tokens):
        raise RuntimeError(f"transformers generated {tuple(out.shape)}, expected {(prompts.shape[0], prompts.shape[1] + new_tokens)}")
    return elapsed, out[:, prompts.shape[1]:].cpu()


def measure_hf(model_cfg, ours, prompts: torch.Tensor, output_len: int, *, repeats: int, warmup: int,
               cache: str = "static", compile_: bool = False, experts: str | None = None, progress=None) -> dict:
    """-> {"prefill_tok_s", "decode_tok_s", ... , "tokens": [B, O] host tensor} (tokens popped by the caller)."""
    hf = build_hf_model(model_cfg, ours, experts)
    used_cache = cache
    try:
        for _ in range(max(warmup, 1)):  # both shapes timed below: each static cache size is built once here
            _timed_generate(hf, prompts, 1, used_cache, compile_)
            _timed_generate(hf, prompts, output_len, used_cache, compile_)
    except Exception as exc:  # a static cache transformers cannot build for this model: say so, use its default
        if used_cache != "static":
            raise
        used_cache = f"dynamic (static failed: {type(exc).__name__}: {str(exc)[:200]})"
    cache_arg = "static" if used_cache == "static" else "dynamic"
    prefill, full, tokens = [], [], None
    for _ in range(repeats):
        prefill.append(_timed_generate(hf, prompts, 1, cache_arg, compile_)[0])
        seconds, tokens = _timed_generate(hf, prompts, output_len, cache_arg, compile_)
        full.append(seconds)
        if progress is not None:
            progress.update(1)
    b, l = prompts.shape
    p, f = statistics.median(prefill), statistics.median(full)
    decode_s = max(f - p, 1e-9)
    info = {
        "prefill_tok_s": b * l / p, "decode_tok_s": b * (output_len - 1) / decode_s,
        "prefill_s": prefill, "generate_s": full, "decode_s_median": decode_s,
        "cache": used_cache, "compile": compile_,
        "attn_implementation": getattr(hf.config, "_attn_implementation", None),
        "experts_implementation": getattr(hf.config, "_experts_implementation", None),
        "tokens": tokens,
    }
    del hf
    if ours.device.type == "cuda":
        torch.cuda.empty_cache()
    return info
