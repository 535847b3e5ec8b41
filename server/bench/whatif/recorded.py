"""Routing sources that were recorded: a model's own router on the run's prompts, or a trace.

source=model runs the routing model (bench.routing_model: the simulated model itself, or a
named model such as the trained tiny one) through the real engine in this process, at
ep_size 1 with the natural policy, on prompts of real text of the run's lengths (Python
standard library source, what the embedded model was trained on), asking every request for
its routed experts with the prompt (GenerateRequest.return_routed_experts): per request and
position, the router's top-k at every MoE layer. Decoding is greedy, so the generated positions are the model's own
continuations. Each token of the what-if's steps then reads the row of its (request,
position): under natural routing a token's choice does not depend on the batch it ran in.
Sets larger than bench.routing_pool record that many requests of the set's longest length
and request i reads recorded request i mod pool. Under bench.whatif_validate the routing model
runs the set's own prompts instead, every one of them: the real engine it is checked against
runs those prompts, and the check compares step times only where both route the same tokens
(text and random-token prompts decode to different tokens, so different experts are active).

source=trace reads a routing=record trace (bench.routing_trace; the default is the trained
tiny model's routing of held-out text shipped with epserve).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...config import AppConfig, ConfigError, ModelConfig, thaw
from ...engine.api import RoutedExpertsMode, SamplingParams, StopParams
from ...core.step_io import EngineRequest
from ...model.loader import TINY_MODEL_DIR, read_model_spec
from ...moe.routing.trace_file import TraceError, read_trace
from ..request_sets import RequestSet
from .shape_map import ShapeMap
from .sources import SourceRequest, StreamSource, TableSource, run_offsets

DEFAULT_TRACE = TINY_MODEL_DIR / "heldout_routing.eptrace"


def record_routed_experts(model: ModelConfig, requests: RequestSet, device: str = "auto") -> list[np.ndarray]:
    """[B] per request [prompt + output - 1, MoE layers, k] int16: the router's top-k at every
    position the engine runs, from a real in-process engine at ep_size 1 (natural routing)."""
    from ...core.startup import build_engine_core

    per_seq = -(-requests.max_total_len // 16) + 1
    seqs = min(requests.batch, 256)
    app = AppConfig.from_dict({
        "model": {"name": model.name, "path": model.path, "shape": None if model.shape is None else thaw(model.shape),
                  "dtype": model.dtype, "max_model_len": max(model.max_model_len, requests.max_total_len + 1),
                  "seed": model.seed},
        "parallel": {"ep_size": 1, "device": device}, "routing": {"name": "natural"},
        "engine": {"max_num_seqs": seqs, "max_num_batched_tokens": max(4096, requests.max_total_len),
                   "kv_block_size": 16, "kv_cache_tokens": 16 * (seqs * per_seq + 8), "max_queue": requests.batch,
                   "gpu_memory_utilization": 0,  # the cache sized above: the what-if's probes share the device
                   "warmup": False, "overlap": False},
    })
    core = build_engine_core(app)
    rows: dict[int, list[bytes]] = {i: [] for i in range(requests.batch)}
    try:
        stops = StopParams(max_new_tokens=requests.output_len, ignore_eos=True)
        for i, prompt in enumerate(requests.prompts):
            core.add_request(EngineRequest(i, tuple(prompt), SamplingParams(temperature=0.0, seed=0), stops,
                                           routed_experts=RoutedExpertsMode.WITH_PROMPT))
        left = set(rows)
        while left:
            out = core.step()
            for i, req in enumerate(out.req_ids):
                if out.routed and out.routed[i]:
                    rows[req].append(out.routed[i])
            left.difference_update(out.finished)
        layers, k = core.spec.num_moe_layers, core.spec.top_k
    finally:
        core.shutdown(graceful=True)
    return [np.frombuffer(b"".join(rows[i]), dtype="<u2").astype(np.int16).reshape(-1, layers, k)
            for i in range(requests.batch)]


def _routing_model(req: SourceRequest) -> ModelConfig:
    name = req.settings.bench.routing_model
    if req.settings.bench.routes_with_simulated_model:
        return req.settings.model
    if name == "tiny":
        return ModelConfig(name="tiny")
    return ModelConfig(name=str(name), path=str(name))


def text_prompts(model: ModelConfig, lengths: list[int], output_len: int, seed: int) -> RequestSet:
    """Prompts of real text with the given token lengths: Python standard library source (what
    the embedded model was trained on) tokenized by the routing model's tokenizer, each prompt
    a slice at a seeded offset of the files' concatenated tokens."""
    import logging
    import sysconfig

    from ...model.loader import load_tokenizer

    tokenizer = load_tokenizer(model)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)  # long-input warning
    need = sum(lengths) * 4 + 4096
    ids: list[int] = []
    for f in files:
        ids.extend(tokenizer.encode(f.read_text(errors="replace"), add_special_tokens=False))
        if len(ids) >= need:
            break
    if len(ids) < max(lengths) + 1:
        raise ConfigError(f"bench.routing_source=model: too little text to build {max(lengths)}-token prompts")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - max(lengths), size=len(lengths))
    return RequestSet(tuple(tuple(ids[a:a + n]) for a, n in zip(starts.tolist(), lengths)), output_len)


def _pool(req: SourceRequest, model: ModelConfig) -> RequestSet:
    """The requests the routing model runs: the set's lengths, or `routing_pool` of its longest;
    under bench.whatif_validate the set itself (the prompts the engine reference runs)."""
    o, reqs = req.settings.bench, req.requests
    if o.whatif_validate:
        return reqs
    lengths = reqs.lengths if reqs.batch <= o.routing_pool else [max(reqs.lengths)] * o.routing_pool
    return text_prompts(model, lengths, reqs.output_len, o.seed)


def build_model_source(req: SourceRequest) -> TableSource:
    model = _routing_model(req)
    src_spec = read_model_spec(model)
    pool = _pool(req, model)
    per_request = record_routed_experts(model, pool, req.settings.parallel.device)
    width = max(r.shape[0] for r in per_request)
    table = np.zeros((len(per_request), width, src_spec.num_moe_layers, src_spec.top_k), dtype=np.int16)
    for i, r in enumerate(per_request):
        table[i, :r.shape[0]] = r
    if pool.batch < req.requests.batch:  # request i reads recorded request i mod pool
        table = table[np.arange(req.requests.batch) % pool.batch]
    shape = _shape_map(src_spec.num_experts, src_spec.top_k, src_spec.num_moe_layers, req.spec)
    prompts = "the set's own prompts" if pool is req.requests else "prompts of Python source"
    note = (f"router of {model.name} (natural, greedy decode) on {pool.batch} {prompts}"
            + ("" if shape.identity else f", carried from {src_spec.num_experts} experts top-{src_spec.top_k}"))
    return TableSource(torch.from_numpy(table).to(req.device), shape, note)


def build_trace_source(req: SourceRequest) -> StreamSource:
    path = Path(req.settings.bench.routing_trace or DEFAULT_TRACE)
    try:
        trace = read_trace(path)
    except (TraceError, OSError) as exc:
        raise ConfigError(f"bench.routing_trace: {exc}") from None
    shape = _shape_map(trace.header.num_experts, trace.header.top_k, trace.num_layers, req.spec)
    layers = [t.to(req.device) for t in trace.layers]
    if any(t.shape[0] == 0 for t in layers):
        raise ConfigError(f"bench.routing_trace: {path} has a layer with no recorded tokens")
    note = (f"trace {path.name} ({trace.layers[0].shape[0]} tokens x {trace.num_layers} layers, "
            f"{trace.header.num_experts} experts top-{trace.header.top_k})")
    return StreamSource(layers, shape, run_offsets(req.steps), note)


def _shape_map(experts: int, top_k: int, layers: int, spec) -> ShapeMap:
    try:
        return ShapeMap(experts, top_k, layers, spec.num_experts, spec.top_k)
    except ValueError as exc:
        raise ConfigError(f"bench.routing_source: {exc}; use bench.routing_source=profile for this shape") from None
