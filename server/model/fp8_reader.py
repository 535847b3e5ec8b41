"""Read an FP8 block-quantised checkpoint as if it held values: each e4m3 weight comes back
dequantised (float32) with its weight_scale_inv, so the loader (weights.py) and its per-rank
expert selection stay exactly as for a bf16 checkpoint, and only this rank's experts, codes
and scales, are ever read from disk.

Which tensors are quantised is what the file says, not a list of names: a tensor stored as
F8_E4M3 must have `<name>_scale_inv` beside it with one scale per block; anything stored as
values (norms, embeddings, the router, modules_to_not_convert) is read as it is. A checkpoint
that breaks this (a missing scale, scales of another block size or shape, an FP8 tensor that
modules_to_not_convert says is kept unquantised) is refused naming the tensor, at start-up
(check_scales reads only headers) and again wherever the loader meets it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointReader
from ..kernels.fp8_blocks import dequantize_blocks, implied_block, scale_shape
from .spec import Fp8BlockScheme, ModelLoadError

FP8_DTYPE = "F8_E4M3"
# ...self_attn.q_proj.weight -> ...q_proj.weight_scale_inv; fused ...experts.gate_up_proj -> ...gate_up_proj_scale_inv
SCALE_SUFFIX = "_scale_inv"
_SCALE_DTYPES = ("F32", "BF16", "F16")


def open_checkpoint(folder: str | Path, scheme: Fp8BlockScheme | None) -> CheckpointReader:
    """The reader for a checkpoint stored as `scheme` says (None: values only)."""
    return CheckpointReader(folder) if scheme is None else Fp8BlockReader(folder, scheme)


class Fp8BlockReader(CheckpointReader):
    def __init__(self, folder: str | Path, scheme: Fp8BlockScheme) -> None:
        super().__init__(folder)
        self.scheme = scheme

    def is_fp8(self, name: str) -> bool:
        return self.stored_dtype(name) == FP8_DTYPE

    def scale_of(self, name: str) -> str:
        """The checked name of the block scales of FP8 tensor `name`, or ModelLoadError naming it."""
        where = f"tensor {name!r} in {self.file_of(name)}"
        module = name.removesuffix(".weight")
        kept = self.scheme.keeps_unquantised(module)
        if kept is not None:
            raise ModelLoadError(f"{where} is stored as {FP8_DTYPE}, but quantization_config.modules_to_not_convert "
                                 f"({kept!r}) says {module!r} is kept unquantised: store it as bf16/fp16/fp32")
        scale = name + SCALE_SUFFIX
        if not self.has(scale):
            raise ModelLoadError(f"{where} is stored as {FP8_DTYPE} but its block scales {scale!r} are missing "
                                 "from the checkpoint")
        if self.stored_dtype(scale) not in _SCALE_DTYPES:
            raise ModelLoadError(f"tensor {scale!r} in {self.file_of(scale)} is stored as {self.stored_dtype(scale)}; "
                                 f"block scales must be one of {', '.join(_SCALE_DTYPES)}")
        shape, got, block = self.shape(name), self.shape(scale), self.scheme.block
        want = scale_shape(shape, block) if len(shape) >= 2 else None
        if got != want:
            fits = implied_block(shape, got) if len(shape) >= 2 else None
            hint = f"; they fit weight_block_size {list(fits)}, not quantization_config's {list(block)}" if fits else ""
            need = f"needs {list(want)}" if want else "must be at least 2-D"
            raise ModelLoadError(f"tensor {scale!r} in {self.file_of(scale)} has shape {list(got)}; weight {name!r} "
                                 f"of shape {list(shape)} in blocks of {list(block)} {need}{hint}")
        return scale

    def check_scales(self) -> int:
        """Check every FP8 tensor's scales from the headers alone (no tensor data is read); the
        number of FP8 tensors. Start-up runs this so a malformed checkpoint fails in seconds."""
        fp8 = [name for name in sorted(self.names) if self.is_fp8(name)]
        for name in fp8:
            self.scale_of(name)
        return len(fp8)

    # ---- reads: FP8 tensors dequantised to float32, everything else as CheckpointReader reads it ----
    def read(self, name: str, expected: tuple[int, ...] | None = None, category: str = "other") -> torch.Tensor:
        if not self.is_fp8(name):
            return super().read(name, expected, category)
        scale = self.scale_of(name)
        if expected is not None:
            self.check_shape(name, expected)
        codes = self._open(self._where[name]).get_tensor(name)  # [rows, cols] e4m3
        scales = self._open(self._where[scale]).get_tensor(scale)  # [ceil(rows/b0), ceil(cols/b1)]
        self._count(name, codes, category)
        self._count(scale, scales, category)
        return dequantize_blocks(codes, scales, self.scheme.block)

    def read_rows(self, name: str, start: int, stop: int, expected_row: tuple[int, ...], total_rows: int,
                  category: str = "expert") -> torch.Tensor:
        """Experts [start, stop) of a fused [E, rows, cols] FP8 tensor with its [E, ...] scales."""
        if not self.is_fp8(name):
            return super().read_rows(name, start, stop, expected_row, total_rows, category)
        self.check_shape(name, (total_rows, *expected_row))
        scale = self.scale_of(name)
        codes = self._open(self._where[name]).get_slice(name)[start:stop]  # [n, rows, cols] e4m3
        scales = self._open(self._where[scale]).get_slice(scale)[start:stop]  # [n, ceil(rows/b0), ceil(cols/b1)]
        self._count(name, codes, category)
        self._count(scale, scales, category)
        return dequantize_blocks(codes, scales, self.scheme.block)

    # ---- reads that keep the codes: experts stored as FP8 blocks (server/model/expert_format.py) ----
    def read_codes(self, name: str, expected: tuple[int, int], category: str = "expert") -> tuple[torch.Tensor, torch.Tensor]:
        """FP8 tensor `name` [rows, cols] as (e4m3 codes, float32 scales [ceil(rows/b0), ceil(cols/b1)])."""
        scale = self._fp8_scale(name)
        self.check_shape(name, expected)
        codes = self._open(self._where[name]).get_tensor(name)
        scales = self._open(self._where[scale]).get_tensor(scale)
        self._count(name, codes, category)
        self._count(scale, scales, category)
        return codes, scales.to(torch.float32)

    def read_rows_codes(self, name: str, start: int, stop: int, expected_row: tuple[int, ...], total_rows: int,
                        category: str = "expert") -> tuple[torch.Tensor, torch.Tensor]:
        """Experts [start, stop) of a fused FP8 tensor as (codes [n, rows, cols], float32 scales [n, ...])."""
        scale = self._fp8_scale(name)
        self.check_shape(name, (total_rows, *expected_row))
        codes = self._open(self._where[name]).get_slice(name)[start:stop]
        scales = self._open(self._where[scale]).get_slice(scale)[start:stop]
        self._count(name, codes, category)
        self._count(scale, scales, category)
        return codes, scales.to(torch.float32)

    def _fp8_scale(self, name: str) -> str:
        if not self.is_fp8(name):
            raise ModelLoadError(f"tensor {name!r} in {self.file_of(name)} is stored as {self.stored_dtype(name)}, not "
                                 f"{FP8_DTYPE}, but this model keeps its experts as FP8 blocks; set "
                                 "model.quantization=dequantize to load them as values")
        return self.scale_of(name)
