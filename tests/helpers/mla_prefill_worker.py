"""Both MLA prefill forms of a small DeepSeek-V3 on the Triton path (CPU, Triton's interpreter)
against the torch path, in a fresh process (tests/model/test_mla_prefill_forms.py):

    python -m tests.helpers.mla_prefill_worker '<json params>'   -> last stdout line: JSON

The steps cover whole prompts, a second chunk over a cached prefix, a mixed step (a chunk beside
decoding sequences) and plain decode; kernels.mla_prefill is read from EPSERVE_MLA_PREFILL when
each model is built. Calls of the expanded kernel are counted, so "expanded" must really run it
(and "absorbed" must not)."""
from __future__ import annotations

import json
import os
import sys

PROMPTS = [(0, list(b"Hello world, experts")), (1, list(b"MoE")), (2, list(b"expert parallel!"))]


def _steps(driver, first_tokens: int = 9):
    """Logits [S, V] per step: prompt chunks, then a mixed step, then two decode steps."""
    import torch

    out = []
    step = driver.step([(sid, toks[:first_tokens]) for sid, toks in PROMPTS])  # whole prompts / first chunks
    out.append(torch.stack([step[sid] for sid, _ in PROMPTS]))
    rest = [(sid, toks[first_tokens:]) for sid, toks in PROMPTS if len(toks) > first_tokens]
    done = [(sid, [int(step[sid].argmax())]) for sid, toks in PROMPTS if len(toks) <= first_tokens]
    step = driver.step(rest + done)  # chunks over a cached prefix beside one decoding sequence
    out.append(torch.stack([step[sid] for sid, _ in rest + done]))
    for _ in range(2):
        step = driver.step([(sid, [int(step[sid].argmax())]) for sid, _ in PROMPTS])
        out.append(torch.stack([step[sid] for sid, _ in PROMPTS]))
    return out


def forms_agree(modes=("absorbed", "expanded", "auto"), dtype: str = "float32", auto_threshold: float = 8.3) -> dict:
    """auto_threshold replaces EXPANDED_MIN_QUERIES_PER_KEY: the first step has 171/21 = 8.1
    queries per key (stays absorbed), the second (11 x 20 + 7 x 16 + 1 x 4) / 40 = 8.4 (expanded)."""
    import torch

    from server.kernels import mla_prefill_config
    from server.layers import attention_triton

    mla_prefill_config.EXPANDED_MIN_QUERIES_PER_KEY = auto_threshold
    from tests.helpers.gpu_path_worker import DEEPSEEK_SHAPE
    from tests.helpers.paged_driver import PagedDriver

    calls = {"n": 0}
    kernel = attention_triton.mla_prefill_expanded_triton

    def counted(*args, **kw):
        calls["n"] += 1
        return kernel(*args, **kw)

    attention_triton.mla_prefill_expanded_triton = counted
    shape = dict(DEEPSEEK_SHAPE, dtype=dtype)

    def run(backend: str, mode: str):
        from server.config import ModelConfig
        from server.model.loader import load_model
        from server.moe.routing import build_policy

        os.environ["EPSERVE_KERNEL_BACKEND"], os.environ["EPSERVE_MLA_PREFILL"] = backend, mode
        torch.manual_seed(0)
        model = load_model(ModelConfig(name="deepseek-small", shape=shape), policy=build_policy("natural"))
        calls["n"] = 0
        logits = _steps(PagedDriver(model, num_blocks=32, block_size=4, seed=1))
        return logits, calls["n"]

    ref, _ = run("torch", "absorbed")
    results = {}
    for mode in modes:
        logits, n = run("triton", mode)
        diff = max(float((a - b).abs().max()) for a, b in zip(logits, ref))
        same = all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(logits, ref))
        results[mode] = {"max_diff": diff, "same_tokens": same, "expanded_calls": n}
    tol = 1e-3 if dtype == "float32" else 5e-2
    layers = DEEPSEEK_SHAPE["num_hidden_layers"]
    want_calls = {"absorbed": 0, "expanded": 2 * layers, "auto": layers}  # auto: the second step only
    ok = all(r["max_diff"] < tol and r["same_tokens"] and r["expanded_calls"] == want_calls[m]
             for m, r in results.items())
    return {"ok": ok, "results": results}


if __name__ == "__main__":
    from tests.helpers.gpu_path_worker import _setup

    _setup()
    print(json.dumps(forms_agree(**(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))))
