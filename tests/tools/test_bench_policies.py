"""scripts/bench_policies.py runs on CPU, times every policy (the capacity-solving ones too)
against LightLLM's generator, and imports nothing from tests/ (its baseline lives in
server/moe/routing/lightllm_rule.py). The MoE block beside the policies is timed on CUDA only."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RUN_AND_CHECK_IMPORTS = """
import runpy, sys
sys.argv = ["bench_policies.py"] + sys.argv[1:]
runpy.run_path("scripts/bench_policies.py", run_name="__main__")
leaked = sorted(m for m in sys.modules if m == "tests" or m.startswith("tests."))
assert not leaked, f"bench_policies imported from tests/: {leaked}"
"""


def test_bench_policies_cpu_table(tmp_path: Path) -> None:
    out = tmp_path / "policies.json"
    args = ["--device", "cpu", "--n", "16", "64", "--experts", "16", "--top-k", "4", "--iters", "3", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", RUN_AND_CHECK_IMPORTS, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| LightLLM generator | 16 | 16 |" in proc.stdout
    doc = json.loads(out.read_text())
    assert (doc["experts"], doc["top_k"], doc["ep_size"]) == ([16], 4, 8)
    for n in (16, 64):
        rows = {r["policy"]: r for r in doc["rows"] if r["n"] == n}
        assert rows["LightLLM generator"]["speedup_vs_lightllm"] == 1.0
        for name in ("natural", "round_robin_balanced", "greedy_balanced", "uniform_random", "skewed", "optimal_balanced",
                     "rank_balanced", "rank_balanced:tolerance=0.1"):
            row = rows[name]
            assert row["eager_us"] > 0 and row["graph_us"] is None and row["vs_moe_block"] is None  # no graphs on CPU
            assert row["experts"] == 16
            expected = rows["LightLLM generator"]["eager_us"] / row["eager_us"]
            assert abs(row["speedup_vs_lightllm"] / expected - 1) < 1e-9
