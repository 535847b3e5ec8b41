"""The training and held-out text: the Python standard library's own .py files.

It lives with the evaluation, which reads its held-out windows, so that the served package
needs no training code; the training script (scripts/tiny_model/train.py) imports it from here.

Why this corpus: every machine that runs epserve has it (no download), it is a few MB of
real, structured text, and code has strong local patterns a small byte-level model can learn.

Tokens are bytes: the embedded tokenizer maps byte b to id b (ids 0..255, no merges; see
scripts/tiny_model/build.py), so the raw file bytes *are* the token ids and no tokenizer call is
needed here. Each file is followed by the <|eos|> id so the model learns where a file ends.

Split: a file is held out when a hash of its path relative to the stdlib root falls in the
held-out fraction; the split is therefore the same on every machine with the same Python
version, and no held-out file is ever seen in training. Test suites (test/, tests/,
idle_test/) and installed packages (site-packages) are skipped: distributions often strip the
former and the latter differ from machine to machine.
"""
from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

EOS_ID = 257  # <|eos|> of the embedded byte-level tokenizer
SKIP_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SPLIT_BUCKETS = 1000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative posix path, file) for every kept .py file, sorted by relative path."""
    root = root or stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_PARTS.isdisjoint(rel.parts) and path.is_file():
            out.append((rel.as_posix(), path))
    if not out:
        raise FileNotFoundError(f"no .py files under {root}: cannot build the training corpus")
    return sorted(out)


def is_heldout(rel_path: str, heldout_permille: int) -> bool:
    bucket = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:4], "little") % SPLIT_BUCKETS
    return bucket < heldout_permille


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # [T_train] int64 token ids (bytes and EOS)
    heldout: torch.Tensor  # [T_heldout] int64
    train_files: int
    heldout_files: int
    fingerprint: str  # sha256 over (path, content) of every file, in order: identifies the data
    root: str
    python: str

    def describe(self) -> dict:
        return {
            "source": "Python standard library .py files (no test suites, no site-packages)",
            "root": self.root, "python": self.python, "fingerprint": self.fingerprint,
            "train_files": self.train_files, "heldout_files": self.heldout_files,
            "train_tokens": int(self.train.numel()), "heldout_tokens": int(self.heldout.numel()),
        }


def load_corpus(heldout_permille: int = 50, root: Path | None = None, max_bytes: int | None = None) -> Corpus:
    """Read and split the corpus. `max_bytes` stops reading once each side holds its share of
    that many bytes (tests use a small slice)."""
    if not 0 < heldout_permille < SPLIT_BUCKETS:
        raise ValueError(f"heldout_permille must be in (0, {SPLIT_BUCKETS}), got {heldout_permille}")
    root = root or stdlib_root()
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    counts = {False: 0, True: 0}
    size = {False: 0, True: 0}
    digest = hashlib.sha256()
    for rel, path in stdlib_files(root):
        data = path.read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        side = is_heldout(rel, heldout_permille)
        parts[side].append(data)
        counts[side] += 1
        size[side] += len(data)
        if max_bytes is not None and size[True] >= max_bytes * heldout_permille // SPLIT_BUCKETS \
                and size[False] >= max_bytes - max_bytes * heldout_permille // SPLIT_BUCKETS:
            break
    if not all(counts.values()):
        raise ValueError(f"the split of {root} left one side empty (train {counts[False]}, held-out {counts[True]} files)")
    return Corpus(
        train=_join(parts[False]), heldout=_join(parts[True]),
        train_files=counts[False], heldout_files=counts[True], fingerprint=digest.hexdigest(),
        root=str(root), python=f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
    )


def _join(files: list[bytes]) -> torch.Tensor:
    """Files -> one stream: bytes of file 0, EOS, bytes of file 1, EOS, ... as int64 ids."""
    eos = bytes([0])  # placeholder byte, replaced by EOS_ID below
    blob = eos.join(files) + eos
    ids = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(torch.int64)  # [T]
    ends = torch.tensor([len(f) for f in files], dtype=torch.int64).add(1).cumsum(0) - 1  # EOS positions
    ids[ends] = EOS_ID
    return ids


def heldout_windows(heldout: torch.Tensor, seq_len: int, num_seqs: int) -> torch.Tensor:
    """[num_seqs, seq_len + 1] consecutive non-overlapping windows from the start of the
    held-out stream (inputs are [:, :-1], next-token targets [:, 1:])."""
    need = num_seqs * (seq_len + 1)
    if heldout.numel() < need:
        raise ValueError(f"held-out text has {heldout.numel()} tokens; {num_seqs} x {seq_len + 1} need {need}")
    return heldout[:need].view(num_seqs, seq_len + 1)
