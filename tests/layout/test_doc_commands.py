"""Every shell command block of README.md and BENCHMARKS.md runs, so a document cannot drift
from the code again.

Each ```bash block is parsed out of the Markdown. A block whose first line is `# GPU only`
(with its reason) needs a GPU or one's measurements and is only parsed; every other command is
run in a cheap form that still composes, resolves and validates it: the server as `dry_run=true`
(every start-up check, nothing loaded or bound), the benchmark as `--cfg job` (its config
composed), a script under scripts/ or the load tool with `--help` after its arguments (they
parse), a shell script with `bash -n`. A checkpoint or trace path a command names as an example is replaced by
the embedded tiny model or a routed-experts file of the tiny model's shape.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "BENCHMARKS.md")
GPU_ONLY = "# GPU only"
_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
TINY = ROOT / "server" / "assets" / "tiny"
LONG_RUNNING = {"epserve-load"}  # console scripts whose documented runs take minutes: checked as scripts/ are
CONSOLE_SCRIPTS = dict(re.findall(r'^(epserve[\w-]*) = "([\w.:]+)"$', (ROOT / "pyproject.toml").read_text(), re.M))


def doc_blocks(doc: str) -> list[tuple[str, int, str]]:
    """(document, block number, text) of every ```bash block."""
    text = (ROOT / doc).read_text()
    return [(doc, i, m.group(1)) for i, m in enumerate(_BLOCK.finditer(text))]


def block_commands(block: str) -> list[list[str]]:
    """The block's commands as argv lists: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


def cheap_form(argv: list[str], scratch: Path) -> list[str]:
    """The command as it runs in this test (see the module docstring); ValueError if it has none."""
    args = [_placeholder(a, argv, scratch) for a in argv]
    head, rest = args[:3], args
    if args[0] in ("./scripts/serve.sh", "epserve", ".venv/bin/epserve") or head == ["python", "-m", "server"]:
        rest = args[3:] if args[0] == "python" else args[1:]
        return [sys.executable, "-m", "server", *rest, *([] if any(a.startswith("--cfg") for a in rest) else
                                                          ["dry_run=true"])]
    if args[0] == "epserve-bench" or head == ["python", "-m", "server.bench"]:
        rest = args[3:] if args[0] == "python" else args[1:]
        return [sys.executable, "-m", "server.bench", *rest, "--cfg", "job"]
    if args[0] == "python" and args[1].startswith("scripts/") and args[1].endswith(".py"):
        return [sys.executable, *args[1:], "--help"]
    if args[0].startswith("./scripts/") and args[0].endswith(".sh"):
        return ["bash", "-n", args[0][2:]]
    if args[0] == "source" and args[1] == ".venv/bin/activate":  # the folder scripts/env.sh creates
        return ["grep", "-q", 'VENV="${EPSERVE_VENV:-$ROOT/.venv}"', "scripts/env.sh"]
    program = args[0].removeprefix(".venv/bin/")
    if program in CONSOLE_SCRIPTS:  # the installed console script, run from this interpreter
        module, func = CONSOLE_SCRIPTS[program].split(":")
        help_after = ["--help"] if program in LONG_RUNNING else []  # its arguments parse; nothing runs
        return [sys.executable, "-c", f"import sys; sys.argv[0] = {program!r}; from {module} import {func}; {func}()",
                *args[1:], *help_after]
    raise ValueError(f"no cheap form for {shlex.join(argv)!r}: give it one here or mark its block '{GPU_ONLY}: why'")


def _placeholder(arg: str, argv: list[str], scratch: Path) -> str:
    key, _, value = arg.partition("=")
    if key == "model.path" and not Path(value).exists():
        return f"model.path={TINY}"
    if key == "routing.path" and not Path(value).exists() and "routing.layout=routed_experts" in argv:
        layers = int(next(a.split("=")[1] for a in argv if a.startswith("routing.num_layers=")))
        top_k = int(next(a.split("=")[1] for a in argv if a.startswith("routing.top_k=")))
        path = scratch / "routed_experts.bin"
        np.tile(np.arange(top_k, dtype="<u2"), 8 * layers).tofile(path)  # 8 tokens x L x k, k distinct ids
        return f"routing.path={path}"
    return arg


BLOCKS = [b for doc in DOCS for b in doc_blocks(doc)]
COMMANDS = [(doc, i, argv) for doc, i, text in BLOCKS if not text.startswith(GPU_ONLY) for argv in block_commands(text)]


def test_the_documents_have_command_blocks_and_gpu_blocks_say_so():
    assert {doc for doc, _, _ in COMMANDS} == set(DOCS)
    for doc, i, text in BLOCKS:
        if text.startswith(GPU_ONLY):
            assert text.startswith(GPU_ONLY + ":"), f"{doc} block {i}: say why it needs a GPU after '{GPU_ONLY}:'"
            assert block_commands(text), f"{doc} block {i} holds no command"


@pytest.mark.parametrize("doc, block, argv", COMMANDS, ids=[f"{d}#{i}:{' '.join(a[:4])}" for d, i, a in COMMANDS])
def test_documented_command_runs(doc: str, block: int, argv: list[str], tmp_path: Path) -> None:
    command = cheap_form(argv, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, f"{doc} block {block}: {shlex.join(argv)}\n-> {shlex.join(command)}\n{run.stderr[-3000:]}"
