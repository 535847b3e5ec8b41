"""`replay`: route by a trace that `routing=record` wrote, so any model (random weights at a
real model's size included) carries a real model's routing imbalance.

    python -m server routing=replay routing.path=/tmp/tiny.eptrace
    python -m server routing=replay routing.path=/tmp/tiny.eptrace routing.on_mismatch=remap model.shape=...

Two ways to replay, chosen by whether the served model has the trace's shape:

exact (num_experts, top_k and the number of MoE layers equal the trace's): every MoE layer
  replays its own recorded ids. The trace is a per-layer token stream; token i of this rank's
  part of a step takes row `start + token_offset + i` (mod the rows recorded at that layer).
  So one recorded step replays bit for bit, and a step of N tokens always carries the load of
  N real routed tokens. Every step starts again at row `start`: the policy is stateless and
  deterministic, like every policy. With `advance=true` a per-layer cursor on the device moves
  past the rows each call used, so step s replays recorded step s (a whole multi-step
  recording round-trips); the output then depends on the calls before it (still no host
  sync, CUDA-graph safe). With ep_size > 1, `advance` needs one trace per rank ({rank} in
  the path, as `record` writes them); rank r then reads its own file from its row 0.

remap (shapes differ and routing.on_mismatch=remap): what carries over is each layer's
  expert popularity. The recorded per-expert share is laid out over [0, 1) (expert e of E_t
  owns [e/E_t, (e+1)/E_t)) and each served expert takes the share of its own interval, so
  with E = m * E_t every recorded expert becomes m equally popular experts (per-expert
  max/mean unchanged, hot EP ranks stay hot) and with fewer experts neighbours merge. The
  shares become inclusion probabilities summing to the served k (capped at 1, the excess
  moved to the others), and tokens draw k distinct experts by systematic sampling, as
  `skewed` does. MoE layer l uses trace layer l mod L_t. Lost: which experts co-occur in a
  token, and step-to-step variation.

With routing.on_mismatch=error (the default) a shape mismatch stops start-up with a
ConfigError naming the keys. The number of MoE layers is checked when the caller passes it
to `validate` (the evaluation does); otherwise an exact replay refuses at the first call of
a layer the trace does not have.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .base import PolicyConfigError, RoutingPolicy
from .context import RoutingContext
from .hashing import stream_key
from .record import RANK_FIELD, rank_path
from .registry import register_policy
from .routed_layout import read_routed_experts
from .trace_file import RoutingTrace, TraceError, read_header, read_trace

MISMATCH_MODES = ("error", "remap")
LAYOUTS = ("trace", "routed_experts")  # routing=record's trace file, or GenerateResponse.routed_experts ids
_GOLDEN = 0.6180339887498949


def remapped_probabilities(counts: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """Recorded per-expert counts [E_t] -> inclusion probabilities [E] (sum top_k, each <= 1)."""
    e_t = counts.numel()
    share = counts.double() / counts.sum().clamp(min=1)  # [E_t], sums to 1
    if float(share.sum()) == 0.0:
        share = torch.full((e_t,), 1.0 / e_t, dtype=torch.float64)
    edges_t = torch.arange(e_t + 1, dtype=torch.float64) / e_t  # [E_t + 1]
    edges = torch.arange(num_experts + 1, dtype=torch.float64) / num_experts  # [E + 1]
    lo = torch.maximum(edges[:-1, None], edges_t[None, :-1])  # [E, E_t]
    hi = torch.minimum(edges[1:, None], edges_t[None, 1:])
    overlap = (hi - lo).clamp(min=0) * e_t  # fraction of recorded expert j inside served expert i
    p = (overlap @ share) * top_k  # [E], sums to top_k
    for _ in range(num_experts):  # water-filling: cap at 1, hand the excess to the uncapped
        over = p > 1.0
        if not bool(over.any()):
            break
        excess = float((p[over] - 1.0).sum())
        p[over] = 1.0
        free = p < 1.0
        room = torch.where(free, p, torch.zeros_like(p))
        if float(room.sum()) == 0.0:
            room = free.double()
        p = p + excess * room / room.sum()
    return p


def systematic_ids(cumulative: torch.Tensor, n: int, top_k: int, token_offset, shift: float) -> torch.Tensor:
    """k distinct ids per token with inclusion probabilities given by `cumulative` [E]."""
    device = cumulative.device
    token = torch.arange(n, device=device, dtype=torch.float64) + token_offset  # [N] global token index
    u = torch.frac(token * _GOLDEN + shift)  # [N] in [0, 1)
    points = u[:, None] + torch.arange(top_k, device=device, dtype=torch.float64)  # [N, k]
    ids = torch.searchsorted(cumulative, points, right=True)  # [N, k]
    return ids.clamp_(max=cumulative.numel() - 1).to(torch.int32)


@register_policy("replay")
class ReplayPolicy(RoutingPolicy):
    guarantee = "the recorded trace's load: exact ids, or its per-layer expert popularity (remap)"
    uses_files: ClassVar[bool] = True

    def __init__(self, path: str | None = None, weights: str = "keep", seed: int = 0, on_mismatch: str = "error",
                 advance: bool = False, start: int = 0, layout: str = "trace", num_layers: int | None = None,
                 top_k: int | None = None) -> None:
        super().__init__(weights=weights, seed=seed)
        if layout not in LAYOUTS:
            raise PolicyConfigError(f"routing.layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "routed_experts":
            for key, value in (("num_layers", num_layers), ("top_k", top_k)):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise PolicyConfigError(f"routing.layout=routed_experts needs routing.{key} (the RoutedExperts "
                                            f"message's {key}), a positive integer; got {value!r}")
        self.layout, self.num_layers, self.top_k = layout, num_layers, top_k
        if not isinstance(path, str) or not path:
            raise PolicyConfigError("routing.path must name a trace written by routing=record")
        if on_mismatch not in MISMATCH_MODES:
            raise PolicyConfigError(f"routing.on_mismatch must be one of {MISMATCH_MODES}, got {on_mismatch!r}")
        if not isinstance(advance, bool):
            raise PolicyConfigError(f"routing.advance must be true or false, got {advance!r}")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise PolicyConfigError(f"routing.start must be a non-negative integer (a row of the trace), got {start!r}")
        self.path, self.on_mismatch, self.advance, self.start = path, on_mismatch, advance, start
        self.per_rank = RANK_FIELD in path
        try:  # fail at start-up, not in the first forward
            self._traces: dict[int, RoutingTrace] = {} if self.per_rank else {0: self._read(0)}
            self.header = self._traces[0].header if self._traces else self._read_header(0)
        except TraceError as exc:
            raise PolicyConfigError(f"routing.path: {exc}") from None
        self._device_cache: dict[tuple, torch.Tensor] = {}  # (kind, rank, layer, device) -> tensor; bounded by the model

    def params(self) -> dict:
        out = {**super().params(), "path": self.path, "on_mismatch": self.on_mismatch, "advance": self.advance,
               "start": self.start, "layout": self.layout}
        if self.layout == "routed_experts":
            out.update(num_layers=self.num_layers, top_k=self.top_k)
        return out

    def _read(self, rank: int) -> RoutingTrace:
        if self.layout == "routed_experts":
            return read_routed_experts(rank_path(self.path, rank), self.num_layers, self.top_k)
        return read_trace(rank_path(self.path, rank))

    def _read_header(self, rank: int):
        if self.layout == "routed_experts":
            return self._read(rank).header
        return read_header(rank_path(self.path, rank))

    # ---- shape checks ----
    def trace(self, rank: int = 0) -> RoutingTrace:
        key = rank if self.per_rank else 0
        if key not in self._traces:
            try:
                self._traces[key] = self._read(rank)
            except TraceError as exc:
                raise PolicyConfigError(f"routing.path: {exc}") from None
        return self._traces[key]

    def mismatches(self, num_experts: int, top_k: int, num_layers: int | None = None) -> list[str]:
        h, out = self.header, []
        # a routed-experts file only shows the largest id it holds, not the model's expert count
        if num_experts < h.num_experts if self.layout == "routed_experts" else num_experts != h.num_experts:
            out.append(f"num_experts: model {num_experts}, trace {h.num_experts}")
        if top_k != h.top_k:
            out.append(f"top_k: model {top_k}, trace {h.top_k}")
        if num_layers is not None and num_layers != self.trace(0).num_layers:
            out.append(f"MoE layers: model {num_layers}, trace {self.trace(0).num_layers}")
        return out

    def validate(self, num_experts: int, top_k: int, ep_size: int, num_layers: int | None = None) -> None:
        for rank in range(ep_size if self.per_rank else 1):
            try:
                h = self._read_header(rank)
            except TraceError as exc:
                raise PolicyConfigError(f"routing.path: {exc}") from None
            if h.top_k != self.header.top_k or (self.layout == "trace" and h.num_experts != self.header.num_experts):
                raise PolicyConfigError(f"routing.path: rank {rank}'s trace has another shape than rank 0's")
        if self.advance and ep_size > 1 and not self.per_rank:
            raise PolicyConfigError(f"routing.advance=true with parallel.ep_size={ep_size} needs one trace per rank: "
                                    f"put {RANK_FIELD} in routing.path (routing=record writes them so)")
        bad = self.mismatches(num_experts, top_k, num_layers)
        if bad and self.on_mismatch == "error":
            raise PolicyConfigError(
                f"routing.path={self.path!r} was recorded on another model shape ({'; '.join(bad)}). "
                "Set routing.on_mismatch=remap to replay its per-layer expert popularity instead of its ids")

    # ---- routing ----
    def route(self, topk_ids, topk_weights, router_logits, ctx: RoutingContext) -> torch.Tensor:
        n, device = topk_ids.shape[0], topk_ids.device
        if self.mismatches(ctx.num_experts, ctx.top_k):
            return self._remap(n, ctx, device)
        trace = self.trace(ctx.ep_rank)
        if ctx.layer >= trace.num_layers:
            if self.on_mismatch == "remap":
                return self._remap(n, ctx, device)
            raise PolicyConfigError(f"routing.path={self.path!r} has {trace.num_layers} MoE layers; the model has more "
                                    f"(layer {ctx.layer} was called). Set routing.on_mismatch=remap")
        table = self._cached(("ids", ctx.ep_rank, ctx.layer, device), lambda: self._table(trace, ctx.layer, device))
        rows = table.shape[0]  # [rows, k] int32
        base = self.start + (0 if self.per_rank else ctx.token_offset)  # int, or 0-d tensor (graphs)
        index = torch.arange(n, device=device, dtype=torch.int64) + base  # [N]
        if self.advance:
            cursor = self._cached(("cursor", ctx.ep_rank, ctx.layer, device),
                                  lambda: torch.zeros((), dtype=torch.int64, device=device))
            index = index + cursor
            cursor.add_(n)
        return table[index % rows]  # [N, k] int32

    def _table(self, trace: RoutingTrace, layer: int, device) -> torch.Tensor:
        ids = trace.layers[layer]
        if ids.shape[0] == 0:
            raise PolicyConfigError(f"routing.path={self.path!r}: the trace recorded no tokens at MoE layer {layer}")
        return ids.to(device)

    def _remap(self, n: int, ctx: RoutingContext, device) -> torch.Tensor:
        def build() -> torch.Tensor:
            trace = self.trace(ctx.ep_rank)
            counts = trace.expert_counts(ctx.layer % trace.num_layers)
            cum = torch.cumsum(remapped_probabilities(counts, ctx.num_experts, ctx.top_k), 0)
            cum = cum * (ctx.top_k / cum[-1])
            cum[-1] = float(ctx.top_k) + 1.0  # the last expert closes the range
            return cum.to(device)

        cum = self._cached(("cum", ctx.ep_rank, ctx.layer, ctx.num_experts, ctx.top_k, device), build)  # [E] float64
        shift = stream_key(self.seed, ctx.seed, ctx.layer, 11) / 2**32
        return systematic_ids(cum, n, ctx.top_k, ctx.token_offset, shift)

    def _cached(self, key: tuple, make) -> torch.Tensor:
        value = self._device_cache.get(key)
        if value is None:
            value = self._device_cache[key] = make()
        return value

    def release(self) -> None:
        """Switched away from: drop the traces read and the tables built from them (read again
        from the file if the policy is used again)."""
        self._traces = {}
        self._device_cache = {}

    def reset(self) -> None:
        """Rewind every `advance` cursor to row `start`."""
        for key, value in self._device_cache.items():
            if key[0] == "cursor":
                value.zero_()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_device_cache"] = {}  # device tensors stay in the process that made them
        return state
