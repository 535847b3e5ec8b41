"""Run epserve's Triton kernels on CPU through Triton's interpreter.

Triton picks compiled vs interpreted per @triton.jit function when it is decorated, from
TRITON_INTERPRET, and that includes triton.language's own helpers (tl.zeros, tl.cumsum...).
So the variable must be set before anything imports triton: in-process toggling breaks as
soon as another test imported triton first. Interpreter checks therefore run in a fresh
subprocess (`run_in_interpreter` for the cases in checks.py, `run_source_in_interpreter` for
inline scripts), which calls `enable_interpreter()` before importing any
kernel; the parent test process never changes its own environment.

`enable_interpreter` also works around triton-lang/triton#9171 (fixed upstream after 3.6.0):
with numpy >= 2.4 the interpreter's scalar-to-index conversion raises inside `range(0, n)`
when n is a runtime scalar ("only 0-dimensional arrays can be converted to Python scalars").
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def enable_interpreter() -> None:
    """Switch this (fresh) process to Triton's interpreter; fails if triton is already loaded."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before enable_interpreter(); run the check in a fresh process")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_epserve_numpy24", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._epserve_numpy24 = True
    interpreter._patch_lang_tensor = patched


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _run_interpreted(args: list[str], what: str, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run `python <args>` from the repo root with the interpreter on; its stdout, or RuntimeError."""
    env = dict(os.environ, **(env or {}), TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout_s, env=env, cwd=_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"interpreter check {what} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def run_in_interpreter(case: str, timeout_s: float = 120.0, **params) -> dict:
    """Run checks.<case>(**params) under TRITON_INTERPRET=1 in a subprocess; return its result dict."""
    out = _run_interpreted(["-m", "tests.kernels.support.checks", case, json.dumps(params)], f"{case}({params})",
                           timeout_s)
    return json.loads(out.strip().splitlines()[-1])


def run_source_in_interpreter(source: str, timeout_s: float = 300.0, env: dict[str, str] | None = None) -> str:
    """Run a Python script under TRITON_INTERPRET=1 in a subprocess (enable_interpreter first),
    with `env` added to the environment; return its stdout. For checks that compare a kernel
    with its torch twin inline, and for running a script's CPU smoke mode."""
    prelude = "from tests.kernels.support.interpret import enable_interpreter\nenable_interpreter()\n"
    return _run_interpreted(["-c", prelude + source], "script", timeout_s, env)
