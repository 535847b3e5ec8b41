"""The routing-trace file that `routing=record` writes and `routing=replay` reads.

Layout (little-endian), made to be appended while a server runs and read back in one pass:

    b"EPTRACE1"                       magic
    u32 n, then n bytes of JSON       header: format, version, num_experts, top_k, id_dtype,
                                      ep_rank, ep_size (and whatever else the writer adds)
    then blocks, each:
    u32 n, then n bytes of JSON       {"calls": [[step, layer, tokens], ...]} in call order
    sum(tokens) * top_k ids           the calls' top-k expert ids, row-major, in call order,
                                      as id_dtype (uint8 when E <= 256, int16 when E <= 32768, else int32)

A call is one policy call: one MoE layer of one forward step on one EP rank. `step` counts
forward steps (a call at a layer index not above the previous call's starts a new step).
Each EP rank writes its own file. A truncated last block (a killed process) is reported by
the reader with the byte offset, never skipped silently.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

MAGIC = b"EPTRACE1"
FORMAT = "epserve-routing-trace"
VERSION = 1
_U32 = struct.Struct("<I")
_NUMPY = {"uint8": np.uint8, "int16": np.dtype("<i2"), "int32": np.dtype("<i4")}


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and what is wrong."""


def id_dtype_name(num_experts: int) -> str:
    """Smallest id type that holds every expert id of a model with `num_experts` experts."""
    if num_experts <= 256:
        return "uint8"
    if num_experts <= 32768:
        return "int16"
    return "int32"


def torch_id_dtype(name: str) -> torch.dtype:
    return {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}[name]


@dataclass(frozen=True)
class TraceHeader:
    num_experts: int
    top_k: int
    id_dtype: str
    ep_rank: int = 0
    ep_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, "version": VERSION, "num_experts": self.num_experts, "top_k": self.top_k,
                           "id_dtype": self.id_dtype, "ep_rank": self.ep_rank, "ep_size": self.ep_size,
                           **self.extra}).encode()


class TraceWriter:
    """Appends blocks to a new trace file (the file is created, or truncated, on open)."""

    def __init__(self, path: str | Path, header: TraceHeader) -> None:
        self.path = Path(path)
        self.header = header
        self._np_dtype = _NUMPY[header.id_dtype]
        self._file: BinaryIO | None = open(self.path, "wb")
        head = header.to_json()
        self._file.write(MAGIC + _U32.pack(len(head)) + head)
        self._file.flush()

    def write_block(self, calls: list[tuple[int, int, int]], ids: torch.Tensor) -> None:
        """calls: (step, layer, tokens) in call order; ids: [sum(tokens), k] on the host."""
        if self._file is None:
            raise ValueError(f"trace {self.path} is closed")
        rows = sum(c[2] for c in calls)
        if tuple(ids.shape) != (rows, self.header.top_k):
            raise ValueError(f"block ids have shape {tuple(ids.shape)}, calls need ({rows}, {self.header.top_k})")
        meta = json.dumps({"calls": [list(c) for c in calls]}).encode()
        self._file.write(_U32.pack(len(meta)) + meta)
        self._file.write(ids.numpy().astype(self._np_dtype, copy=False).tobytes())
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class RoutingTrace:
    """A whole trace in memory: per MoE layer, every recorded token's ids in call order."""

    path: Path
    header: TraceHeader
    calls: list[tuple[int, int, int]]  # (step, layer, tokens)
    layers: list[torch.Tensor]  # [layer] -> [rows, k] int32 (CPU)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_steps(self) -> int:
        return 1 + max((c[0] for c in self.calls), default=-1)

    def expert_counts(self, layer: int) -> torch.Tensor:
        """[E] int64 (token, expert) assignments per expert at `layer`."""
        return torch.bincount(self.layers[layer].reshape(-1).long(), minlength=self.header.num_experts)


def _read_exact(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    start = f.tell()
    data = f.read(n)
    if len(data) != n:
        raise TraceError(f"{path}: truncated at byte {start}: {what} needs {n} bytes, found {len(data)} "
                         "(was the recording process killed before it flushed?)")
    return data


def _read_json(f: BinaryIO, path: Path, what: str) -> dict:
    (n,) = _U32.unpack(_read_exact(f, 4, path, f"{what} length"))
    try:
        value = json.loads(_read_exact(f, n, path, what))
    except ValueError as exc:
        raise TraceError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise TraceError(f"{path}: {what} must be a JSON object")
    return value


def _parse_header(f: BinaryIO, path: Path) -> TraceHeader:
    if f.read(len(MAGIC)) != MAGIC:
        raise TraceError(f"{path}: not an epserve routing trace (bad magic; routing=record writes these)")
    raw = _read_json(f, path, "header")
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise TraceError(f"{path}: format {raw.get('format')!r} version {raw.get('version')!r} is not {FORMAT!r} v{VERSION}")
    try:
        known = {k: raw.pop(k) for k in ("num_experts", "top_k", "id_dtype", "ep_rank", "ep_size")}
    except KeyError as exc:
        raise TraceError(f"{path}: header lacks {exc}") from None
    if known["id_dtype"] not in _NUMPY:
        raise TraceError(f"{path}: unknown id_dtype {known['id_dtype']!r}")
    raw.pop("format"), raw.pop("version")
    return TraceHeader(**known, extra=raw)


def read_header(path: str | Path) -> TraceHeader:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file does not exist")
    with open(path, "rb") as f:
        return _parse_header(f, path)


def read_trace(path: str | Path) -> RoutingTrace:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: trace file does not exist")
    with open(path, "rb") as f:
        header = _parse_header(f, path)
        k, itemsize = header.top_k, np.dtype(_NUMPY[header.id_dtype]).itemsize
        calls: list[tuple[int, int, int]] = []
        per_layer: dict[int, list[np.ndarray]] = {}
        while f.peek(1):  # BufferedReader: b"" only at end of file
            block = _read_json(f, path, "block metadata")
            block_calls = [tuple(int(x) for x in c) for c in block.get("calls", [])]
            rows = sum(c[2] for c in block_calls)
            flat = np.frombuffer(_read_exact(f, rows * k * itemsize, path, "block ids"), dtype=_NUMPY[header.id_dtype])
            flat = flat.reshape(rows, k)
            at = 0
            for step, layer, n in block_calls:
                if layer < 0 or n < 0:
                    raise TraceError(f"{path}: bad call record {(step, layer, n)}")
                per_layer.setdefault(layer, []).append(flat[at:at + n])
                at += n
            calls += block_calls
    num_layers = 1 + max(per_layer, default=-1)
    layers = []
    for layer in range(num_layers):
        chunks = per_layer.get(layer, [])
        ids = torch.from_numpy(np.concatenate(chunks).astype(np.int32)) if chunks else torch.zeros(0, k, dtype=torch.int32)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= header.num_experts):
            raise TraceError(f"{path}: layer {layer} has expert ids outside [0, {header.num_experts})")
        layers.append(ids)
    return RoutingTrace(path=path, header=header, calls=calls, layers=layers)
