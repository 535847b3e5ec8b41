"""Write the lm-eval task's documents: context / continuation pairs cut from held-out text.

Why held-out: the tiny model never trained on these files (the split of server/eval/corpus.py,
with the permille its training.json records), so the log-likelihoods are those of unseen text,
not memorized spans. Each document is one window of a held-out standard-library file: a
context of whole lines, then the next line as the continuation. The tiny model's tokenizer is
byte-level, so both are kept to ASCII: what lm-eval tokenizes is exactly the file's bytes.

    python scripts/lmeval/build_windows.py OUT.jsonl [--docs 48] [--context-bytes 256]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from server.eval.corpus import is_heldout, stdlib_files
from server.model.loader import TINY_MODEL_DIR


def windows(docs: int, context_bytes: int) -> list[dict]:
    permille = json.loads((Path(TINY_MODEL_DIR) / "training.json").read_text())["config"]["heldout_permille"]
    files = [path for rel, path in stdlib_files() if is_heldout(rel, permille)]
    out: list[dict] = []
    for path in files:  # sorted by path: the same documents on every machine with this Python
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        for start in (0, len(lines) // 2):  # a file's head and its middle: two windows of each
            doc = _window(lines, start, context_bytes)
            if doc is not None:
                out.append({"id": f"{path.name}:{start + 1}", **doc})
            if len(out) == docs:
                return out
    return out


def _window(lines: list[str], start: int, context_bytes: int) -> dict | None:
    context, i = "", start
    for i in range(start, len(lines)):
        context += lines[i]
        if len(context) >= context_bytes:
            break
    rest = [ln for ln in lines[i + 1:i + 6] if ln.strip()]
    if not rest or not (context + rest[0]).isascii() or len(context) > 2 * context_bytes:
        return None
    return {"context": context, "continuation": rest[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--docs", type=int, default=48)
    p.add_argument("--context-bytes", type=int, default=256)
    args = p.parse_args()
    docs = windows(args.docs, args.context_bytes)
    args.out.write_text("".join(json.dumps(d) + "\n" for d in docs))
    print(f"{len(docs)} documents -> {args.out}")


if __name__ == "__main__":
    main()
