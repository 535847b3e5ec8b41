"""Greedy continuations held against an independent float32 twin: the check a quantised
checkpoint gets on the GPU (tests/model/test_fp8_greedy_gpu.py), and its harness's own check
on CPU (tests/model/test_greedy_twin.py).

The model is the embedded tiny model: it is trained, so most of its greedy decisions have
margins (random weights have near-ties everywhere, where any rounding flips a token). Its
expert intermediate size is zero-padded from 64 to 128 channels, because the block-FP8 expert
kernels take multiples of 128 only (server/model/expert_format.py). The padded channels have
zero gate, up and down weights, so the model computes the same function, and each 128x128
scale block holds the same nonzero values, so it quantises to the same codes.

The twin is transformers in float32 on the checkpoint's dequantised values. It picks each
greedy token; the model under test is fed the twin's tokens (teacher forcing), so its logits
are compared position by position. Its own greedy continuation equals the twin's for all
`steps` tokens exactly when its argmax agrees at every position, so one pass gives both.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import server
from tests.helpers.fp8_checkpoint import dequantized_hf_model, write_fp8_checkpoint
from tests.helpers.hf_models import hf_sequence_logits
from tests.helpers.paged_driver import PagedDriver

TINY = Path(server.__file__).parent / "assets" / "tiny"
PADDED_INTER = 128
#: pure-Python standard-library modules: the tiny model was trained on such text
PROMPT_MODULES = ("json.decoder", "textwrap", "string", "fnmatch", "shlex", "csv", "calendar", "glob")
_EXPERT = re.compile(r"mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


def pad_expert_intermediate(src: Path, dst: Path, inter: int = PADDED_INTER) -> Path:
    """A copy of the HF folder src whose per-expert gate/up rows and down columns are
    zero-padded to `inter` channels (same function, see the module docstring)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    old = cfg["moe_intermediate_size"]
    if inter < old:
        raise ValueError(f"cannot pad {old} expert channels down to {inter}")
    cfg["moe_intermediate_size"] = inter
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = load_file(str(src / "model.safetensors"))
    for name, t in tensors.items():
        kind = _EXPERT.search(name)
        if kind is None:
            continue
        if kind.group(1) == "down_proj":  # [H, I] -> [H, inter]
            tensors[name] = torch.cat([t, t.new_zeros(t.shape[0], inter - old)], dim=1)
        else:  # [I, H] -> [inter, H]
            tensors[name] = torch.cat([t, t.new_zeros(inter - old, t.shape[1])], dim=0)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def stdlib_prompts(count: int, length: int) -> list[list[int]]:
    """`count` byte prompts of `length` bytes, evenly spaced through PROMPT_MODULES' sources."""
    text = "".join(inspect.getsource(importlib.import_module(m)) for m in PROMPT_MODULES).encode()
    stride = (len(text) - length) // count
    return [list(text[i * stride:i * stride + length]) for i in range(count)]


def padded_fp8_checkpoint(root: Path) -> tuple[Path, Path, object]:
    """(the padded values folder, its FP8 block checkpoint, the float32 twin on the checkpoint's
    dequantised values), all under root."""
    values = pad_expert_intermediate(TINY, root / "values")
    dequantised = write_fp8_checkpoint(values, root / "fp8")
    return values, root / "fp8", dequantized_hf_model(values, dequantised, root / "dequantised")


def twin_continuations(twin, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """(each prompt's `steps` greedy tokens, the twin's logits [P, steps, V] float32 that chose them),
    by full recompute (the plainest form)."""
    conts, logits = [], []
    for prompt in prompts:
        ids, rows = list(prompt), []
        for _ in range(steps):
            row = hf_sequence_logits(twin, ids)[-1]
            rows.append(row)
            ids.append(int(row.argmax()))
        conts.append(ids[len(prompt):])
        logits.append(torch.stack(rows))
    return conts, torch.stack(logits)


@torch.no_grad()
def forced_logits(model, prompts: list[list[int]], conts: list[list[int]], block_size: int = 16) -> torch.Tensor:
    """[P, steps, V] float32: the model's logits before each continuation token, all prompts in
    one batch per step (a prefill of the prompts, then one decode step per token)."""
    steps = len(conts[0])
    longest = max(len(p) for p in prompts) + steps
    driver = PagedDriver(model, num_blocks=len(prompts) * -(-longest // block_size) + 4, block_size=block_size)
    out = [driver.step(list(enumerate(prompts)))]
    for j in range(steps - 1):
        out.append(driver.step([(i, [c[j]]) for i, c in enumerate(conts)]))
    return torch.stack([torch.stack([o[i] for o in out]) for i in range(len(prompts))]).float()


def agreement(twin: torch.Tensor, ours: torch.Tensor, conts: list[list[int]], margin: float) -> dict:
    """twin, ours [P, steps, V] -> what the GPU check reads: the share of prompts whose greedy
    continuation is the twin's at every step, the first step each differs (steps: never), the
    relative L2 error of the logits, and every flip where the twin's top-1 led its top-2 by at
    least `margin` (a flip a near-tie cannot explain)."""
    chosen = torch.tensor(conts)  # [P, steps]
    same = ours.argmax(-1) == chosen  # [P, steps]
    top2 = twin.topk(2, dim=-1).values  # [P, steps, 2]
    lead = top2[..., 0] - top2[..., 1]  # [P, steps]
    steps = chosen.shape[1]
    first = [int((~row).nonzero()[0]) if not row.all() else steps for row in same]
    confident_flips = [(int(p), int(s), round(float(lead[p, s]), 4)) for p, s in (~same & (lead >= margin)).nonzero()]
    return {"prompts": len(conts), "steps": steps, "all_equal_share": float(same.all(dim=1).float().mean()),
            "first_difference": first, "rel_err": float((ours - twin).norm() / twin.norm()),
            "margin": margin, "steps_at_margin": int((lead >= margin).sum()), "confident_flips": confident_flips,
            "flip_leads": sorted(round(float(v), 4) for v in lead[~same])}
