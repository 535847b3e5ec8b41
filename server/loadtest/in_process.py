"""The same workload on the engine alone, in this process: the figure the served one is held to.

`epserve-load --compare-in-process` builds the EngineCore from the same Hydra overrides as the
server it spawns (so: same model, policy, limits, and the same CPU thread share as the
engine-core process), submits every stream's prompt at once and steps until all are done.
Nothing of gRPC, IPC, tokenizing or detokenizing is in this figure; served / in-process is what
serving costs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import AppConfig
from .report import percentile
from .workload import LoadSpec, plan_streams


@dataclass(frozen=True)
class InProcessResult:
    tokens: int
    wall_s: float
    ttft_p50_s: float | None
    tpot_p50_s: float | None  # per request: (last token - first token) / (tokens - 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


def compose_app(overrides: list[str]) -> AppConfig:
    """The AppConfig `python -m server <overrides>` would serve (Hydra, at this tool's door)."""
    import conf
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(conf.__file__).parent), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return AppConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))


def run_in_process(overrides: list[str], spec: LoadSpec, runs: int = 2) -> list[InProcessResult]:
    """`runs` identical runs (the first warms up) of `spec`'s prompts, greedy, ignore_eos."""
    from ..engine.api import SamplingParams, StopParams
    from ..core.process import share_cpu
    from ..core.step_io import EngineRequest
    from ..core.startup import build_engine_core

    app = compose_app(overrides)
    share_cpu(app)
    core = build_engine_core(app)
    try:
        plans = plan_streams(spec, core.spec.vocab_size)
        out = []
        for run in range(runs):
            base = run * len(plans)
            start = time.monotonic()
            for p in plans:
                core.add_request(EngineRequest(base + p.index, p.prompt, SamplingParams(temperature=0.0),
                                               StopParams(max_new_tokens=spec.new_tokens, ignore_eos=True)))
            first: dict[int, float] = {}
            last: dict[int, float] = {}
            tokens = 0
            while core.has_work():
                step = core.step()
                now = time.monotonic() - start
                for req_id, ids in zip(step.req_ids, step.token_ids):
                    first.setdefault(req_id, now)
                    last[req_id] = now
                    tokens += len(ids)
            tpot = [(last[r] - first[r]) / (spec.new_tokens - 1) for r in first] if spec.new_tokens > 1 else []
            out.append(InProcessResult(tokens, time.monotonic() - start, percentile(list(first.values()), 50),
                                       percentile(tpot, 50)))
        return out
    finally:
        core.shutdown(graceful=True)
        del core
        _release_device_memory()


def _release_device_memory() -> None:
    """The server started next needs the GPU memory this process's engine cached."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
