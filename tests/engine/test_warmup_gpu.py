"""On CUDA, after the engine's start-up warm-up, steps of token counts it never ran compile no
Triton kernel: every JITFunction's compile cache (JITFunction.device_caches[device][0], Triton
3.x) keeps its size through prefill, mixed and decode steps at random counts."""
from __future__ import annotations

import random

import pytest
import torch

from server.config import AppConfig
from server.frontend.start import start_engine
from tests.engine.test_engine_overlap import serve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def jit_functions() -> list:
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import server.kernels
    import server.moe.kernels

    found = []
    for pkg in (server.kernels, server.moe.kernels):
        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            try:
                module = importlib.import_module(info.name)
            except ImportError:
                continue
            found += [v for v in vars(module).values() if isinstance(v, JITFunction) and v not in found]
    return found


def compiled_variants() -> dict[str, int]:
    return {fn.fn.__name__: sum(len(caches[0]) for caches in fn.device_caches.values()) for fn in jit_functions()}


def test_no_kernel_compiles_after_warm_up() -> None:
    from server.engine.api import GenerationRequest, SamplingParams, StopParams

    app = AppConfig.from_dict({"engine": {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "warmup": True}})
    eng = start_engine(app, in_thread=True)
    try:
        before = compiled_variants()
        assert sum(before.values()) > 0, "the warm-up compiled nothing"
        rng = random.Random(0)
        reqs = [GenerationRequest(f"r{i}", tuple(rng.randrange(1, 200) for _ in range(rng.randrange(1, 300))),
                                  SamplingParams(temperature=0.0), StopParams(max_new_tokens=rng.randrange(1, 12),
                                                                              ignore_eos=True))
                for i in range(96)]
        serve(eng, reqs)  # staggered admissions: prefill, mixed and decode steps of many sizes
        after = compiled_variants()
        grown = {name: (before.get(name, 0), n) for name, n in after.items() if n > before.get(name, 0)}
        assert not grown, f"kernels compiled after the warm-up (name: (before, after)): {grown}"
    finally:
        eng.shutdown()
