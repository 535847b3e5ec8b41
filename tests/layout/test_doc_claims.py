"""Sentences in the documents that state a checkable fact about the code stay true: a count of
tests, the collective a dispatcher uses, when decode graphs apply."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_reliability_doc_counts_the_tests_it_names():
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    match = re.search(r"CI-sized \(`pytest ([^`]+)`\): (\d+) tests", text)
    assert match, "docs/RELIABILITY.md no longer names its CI-sized tests"
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *match.group(1).split()], cwd=ROOT, capture_output=True, text=True, timeout=120)
    collected = int(re.search(r"(\d+) tests? collected", run.stdout).group(1))
    assert collected == int(match.group(2)), f"docs/RELIABILITY.md says {match.group(2)} tests; pytest collects {collected}"


def test_fixed_capacity_dispatch_is_described_by_the_collective_it_calls():
    code = (ROOT / "server" / "moe" / "dispatch" / "all_gather.py").read_text()
    bench = (ROOT / "BENCHMARKS.md").read_text()
    section = bench[bench.index("## 3. Expert parallelism"):]
    section = section[:section.index("\n## ", 1)]
    back = "all_to_all_single" if "dist.all_to_all_single(" in code else "reduce_scatter"
    assert back in section, f"BENCHMARKS.md section 3 should name the return collective {back}"
    assert ("reduce-scatter back" in section) == ("reduce_scatter" in code)


def test_bench_config_says_where_decode_graphs_apply():
    conf = (ROOT / "conf" / "bench" / "config.yaml").read_text()
    line = next(x for x in conf.splitlines() if x.strip().startswith("cuda_graphs:"))
    assert "ep_size 1 on CUDA" not in line and "graph-safe" in line, line
