"""Read routed experts as the API returns them (GenerateResponse.routed_experts) as a routing trace.

The file is the `ids` bytes of one or more responses, concatenated: little-endian uint16,
row-major [tokens, MoE layers, top_k], one row per forward position. It carries no header, so
`routing=replay routing.layout=routed_experts` needs `routing.num_layers` and `routing.top_k`
(the RoutedExperts message's own fields). Every row becomes one token of each layer's stream,
so an exact replay routes position i of a step as the captured position i was routed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .trace_file import RoutingTrace, TraceError, TraceHeader, id_dtype_name


def read_routed_experts(path: str | Path, num_layers: int, top_k: int) -> RoutingTrace:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: routed-experts file does not exist")
    raw = np.fromfile(path, dtype="<u2")
    per_row = num_layers * top_k
    if raw.size == 0 or raw.size % per_row:
        raise TraceError(f"{path}: {raw.size} uint16 ids do not form rows of {num_layers} MoE layers x top-k {top_k} "
                         "(routing.num_layers, routing.top_k)")
    rows = raw.reshape(-1, num_layers, top_k).astype(np.int32)  # [T, L, k]
    num_experts = int(rows.max()) + 1  # at least: the file does not say how many the model had
    header = TraceHeader(num_experts=num_experts, top_k=top_k, id_dtype=id_dtype_name(num_experts),
                         extra={"layout": "routed_experts"})
    layers = [torch.from_numpy(np.ascontiguousarray(rows[:, layer])) for layer in range(num_layers)]
    return RoutingTrace(path=path, header=header, calls=[(0, layer, rows.shape[0]) for layer in range(num_layers)],
                        layers=layers)
