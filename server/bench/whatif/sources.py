"""Where the what-if's routing comes from: the router's own top-k for every token of a step.

A source answers, for one planned step and one MoE layer, what the router chose for every
token of the step, in global token order (rank 0's rows, then rank 1's, ...): ids [T, k],
weights [T, k] and scores [T, E]. The policy under test then rewrites each rank's slice, with
that rank's RoutingContext, exactly as in serving.

  model    the model's own router on the run's prompts (recorded.py runs it; a trained model
           such as the embedded tiny one routes far from uniformly), one table per request
  trace    a recorded routing trace (routing=record, or return_routed_experts bytes): the
           step's tokens take the trace's next rows, layer by layer, across the whole run
  profile  a named skew profile (profiles.py): the `skewed` policy's popularity solved for
           a published imbalance figure, drawing each step's tokens

Every source may be recorded on another shape: shape_map.py carries it to the simulated one,
and synthesizes the scores it does not record. Registered in SOURCES (bench.routing_source).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ...moe.routing import RoutingContext, RoutingPolicy
from ...registry import Registry
from .plans import PlannedStep
from .shape_map import ShapeMap, synthesized_scores


@dataclass(frozen=True)
class RouterOutput:
    """The router's choice for every token of a step at one layer (global token order)."""

    ids: torch.Tensor  # [T, k] int32
    weights: torch.Tensor  # [T, k] float32
    scores: torch.Tensor  # [T, E] float32 (what policies read as router_logits)


class RoutingSource(Protocol):
    name: str
    note: str  # one line for the report: where this routing came from

    def router_output(self, step: PlannedStep, layer: int) -> RouterOutput: ...


def run_offsets(steps: list[PlannedStep]) -> dict[int, int]:
    """Step index -> tokens in the run before it: a stream position for sources that draw."""
    out, total = {}, 0
    for s in steps:
        out[s.index] = total
        total += s.num_tokens
    return out


def _finish(ids: torch.Tensor, keys: torch.Tensor, num_experts: int, layer: int) -> RouterOutput:
    k = ids.shape[1]
    weights = torch.full(ids.shape, 1.0 / k, dtype=torch.float32, device=ids.device)
    return RouterOutput(ids, weights, synthesized_scores(ids, num_experts, keys, layer))


class TableSource:
    """Per request and position, the recorded ids of every source layer (source=model)."""

    name = "model"

    def __init__(self, table: torch.Tensor, shape: ShapeMap, note: str) -> None:
        self.table = table  # [B, P, L_s, k_s] int16 on the device
        self.shape, self.note = shape, note

    def router_output(self, step: PlannedStep, layer: int) -> RouterOutput:
        dev = self.table.device
        request = torch.cat([torch.from_numpy(t.request) for t in step.tokens]).to(dev)  # [T]
        position = torch.cat([torch.from_numpy(t.position) for t in step.tokens]).to(dev)  # [T]
        if request.numel() and int(position.max()) >= self.table.shape[1]:
            raise ValueError(f"step {step.index} runs position {int(position.max())}; the recorded routing holds "
                             f"{self.table.shape[1]} positions per request")
        src = self.table[request, position, self.shape.source_layer(layer)].long()  # [T, k_s]
        keys = request * 65536 + position  # [T]
        return _finish(self.shape.expand(src, keys, layer), keys, self.shape.num_experts, layer)


class StreamSource:
    """Per layer, a recorded stream of token rows; the run reads it in order (source=trace)."""

    name = "trace"

    def __init__(self, layers: list[torch.Tensor], shape: ShapeMap, offsets: dict[int, int], note: str) -> None:
        self.layers = layers  # [L_s] -> [rows, k_s] int32 on the device
        self.shape, self.offsets, self.note = shape, offsets, note

    def router_output(self, step: PlannedStep, layer: int) -> RouterOutput:
        rows = self.layers[self.shape.source_layer(layer)]
        first = self.offsets[step.index]
        keys = first + torch.arange(step.num_tokens, device=rows.device, dtype=torch.int64)  # [T] run-wide row
        src = rows[keys % rows.shape[0]].long()  # [T, k_s], wrapping round a short trace
        return _finish(self.shape.expand(src, keys, layer), keys, self.shape.num_experts, layer)


class PolicySource:
    """A routing policy standing in for the router (source=profile: `skewed` at a solved shape).

    Called once per step and layer on the whole step, as one rank of `calibrated_ep` holding
    the run's tokens in order: its popularity is the one solved at that EP size, whatever EP
    size is simulated, and its draws continue through the run (token_offset)."""

    name = "profile"

    def __init__(self, policy: RoutingPolicy, num_experts: int, top_k: int, calibrated_ep: int,
                 offsets: dict[int, int], device: torch.device, note: str) -> None:
        self.policy, self.num_experts, self.top_k = policy, num_experts, top_k
        self.calibrated_ep, self.offsets, self.device, self.note = calibrated_ep, offsets, device, note

    def router_output(self, step: PlannedStep, layer: int) -> RouterOutput:
        n, k = step.num_tokens, self.top_k
        first = self.offsets[step.index]
        ctx = RoutingContext(layer=layer, num_experts=self.num_experts, top_k=k, ep_rank=0,
                             ep_size=self.calibrated_ep, token_offset=first)
        blank = torch.zeros(n, k, dtype=torch.int32, device=self.device)
        ids = self.policy.route(blank, blank.float(), torch.zeros(n, self.num_experts, device=self.device), ctx)
        keys = first + torch.arange(n, device=self.device, dtype=torch.int64)
        return _finish(ids, keys, self.num_experts, layer)


class CapturedSource:
    """Router outputs given per (step, layer), e.g. captured from a real EP run's policy calls."""

    name = "captured"

    def __init__(self, outputs: dict[tuple[int, int], RouterOutput], note: str = "captured router outputs") -> None:
        self.outputs, self.note = outputs, note

    def router_output(self, step: PlannedStep, layer: int) -> RouterOutput:
        return self.outputs[(step.index, layer)]


@dataclass(frozen=True)
class SourceRequest:
    """What a source builder gets: the run's settings, the simulated model, its steps."""

    settings: object  # BenchSettings
    spec: object  # the simulated model's ModelSpec
    requests: object  # RequestSet the steps run
    steps: list[PlannedStep]
    device: torch.device


SourceBuilder = Callable[[SourceRequest], RoutingSource]
#: bench.routing_source -> builder (imported on first use)
SOURCES: Registry[SourceBuilder] = Registry("routing source", lazy=True)
SOURCES.register("model", "server.bench.whatif.recorded:build_model_source")
SOURCES.register("trace", "server.bench.whatif.recorded:build_trace_source")
SOURCES.register("profile", "server.bench.whatif.profiles:build_profile_source")
