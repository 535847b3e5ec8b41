"""Read tensors from a Hugging Face safetensors checkpoint: single file or sharded with an index.

Only headers are read up front; tensor data is read on request, whole or as a slice along
dim 0 (get_slice), so a rank can take just its experts out of a fused [E, ...] tensor. Bytes
read are counted per category, which is how tests prove each rank read only its share.
"""
from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .spec import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files (index shards, model.safetensors, or every *.safetensors),
    or ModelLoadError saying what is missing: start-up checks this before anything listens."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    extra = ""
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        extra = " (found PyTorch .bin/.pt weights: convert them to safetensors first)"
    raise ModelLoadError(
        f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards{extra}"
    )


class CheckpointReader:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files = self._weight_files()
        self._stack = ExitStack()
        self._handles = {}
        self._where: dict[str, Path] = {}
        for path in self.files:
            handle = self._open(path)
            for name in handle.keys():
                self._where[name] = path
        self.bytes_read: Counter[str] = Counter()  # category -> bytes
        self.consumed: set[str] = set()

    def _weight_files(self) -> list[Path]:
        return weight_files(self.folder)

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types
                raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from None
            self._handles[path] = handle
        return handle

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- queries ----
    @property
    def names(self) -> set[str]:
        return set(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def stored_dtype(self, name: str) -> str:
        """The safetensors dtype tag on disk, e.g. "BF16", "F8_E4M3" (from the header)."""
        return self._open(self._where[name]).get_slice(name).get_dtype()

    def file_of(self, name: str) -> str:
        return self._where[name].name

    def find(self, candidates: list[str]) -> str:
        """The first candidate name present; a clear error naming them all otherwise."""
        for name in candidates:
            if name in self._where:
                return name
        tried = " or ".join(repr(c) for c in candidates)
        raise ModelLoadError(f"checkpoint {self.folder} is missing tensor {tried}")

    # ---- reads ----
    def read(self, name: str, expected: tuple[int, ...] | None = None, category: str = "other") -> torch.Tensor:
        self.check_dtype(name)
        if expected is not None:
            self.check_shape(name, expected)
        tensor = self._open(self._where[name]).get_tensor(name)
        self._count(name, tensor, category)
        return tensor

    def read_rows(self, name: str, start: int, stop: int, expected_row: tuple[int, ...], total_rows: int,
                  category: str = "expert") -> torch.Tensor:
        """Rows [start, stop) of a tensor of shape (total_rows, *expected_row), reading only those rows."""
        self.check_dtype(name)
        self.check_shape(name, (total_rows, *expected_row))
        tensor = self._open(self._where[name]).get_slice(name)[start:stop]
        self._count(name, tensor, category)
        return tensor

    def check_dtype(self, name: str) -> None:
        """Quantised storage (FP8, int8 packs) holds codes, not values: copying it into a bf16/fp32
        parameter would load garbage, so it is refused (FP8 block checkpoints are read by
        fp8_reader.py when config.json says so; this catches checkpoints that omit it)."""
        dtype = self.stored_dtype(name)
        if dtype not in _VALUE_DTYPES:
            raise ModelLoadError(f"tensor {name!r} in {self._where[name].name} is stored as {dtype}; only "
                                 f"{', '.join(sorted(_VALUE_DTYPES))} weights can be served (dequantise the checkpoint first)")

    def check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        got = self.shape(name)
        if got != tuple(expected):
            raise ModelLoadError(
                f"tensor {name!r} in {self._where[name].name} has shape {list(got)}, expected {list(expected)}"
            )

    def _count(self, name: str, tensor: torch.Tensor, category: str) -> None:
        self.bytes_read[category] += tensor.numel() * tensor.element_size()
        self.consumed.add(name)

    def header_bytes(self, names: list[str]) -> int:
        """Bytes the named tensors take on disk (from the headers only)."""
        total = 0
        for name in names:
            sl = self._open(self._where[name]).get_slice(name)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            total += numel * _DTYPE_BYTES[sl.get_dtype()]
        return total


_VALUE_DTYPES = {"F64", "F32", "F16", "BF16"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
