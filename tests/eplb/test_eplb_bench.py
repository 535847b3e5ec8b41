"""epserve-bench with EPLB on CPU (ep 2 over gloo): stats made from a skewed policy, the run
placed from them; the run's JSON says EPLB was on and its measured per-rank balance is what
redundancy buys against the skew the policy was asked for."""
from __future__ import annotations

import json

from server.moe.eplb.build_stats import main as build_stats_main
from tests.tools.test_bench_cli import TINY, _bench, _check_run

SKEW = ["routing=skewed", "routing.mode=hot_ranks", "routing.target=1.8"]


def test_bench_ep2_with_eplb_stats(tmp_path) -> None:
    stats = tmp_path / "stats.json"
    assert build_stats_main(["policy", "--model", "conf/model/tiny.yaml", "--ep-size", "2", "--routing", "name=skewed",
                             "mode=hot_ranks", "target=1.8", "--tokens", "4096", "-o", str(stats)]) == 0
    proc = _bench(tmp_path, "parallel=ep2", *SKEW, "parallel.redundant_experts=2", f"parallel.eplb_stats={stats}", *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "runs" / "tiny-ep2-eplb2-skewed-modehot_ranks-target1.8.json").read_text())
    _check_run(doc, ep=2)
    assert doc["parallel"]["eplb"] == {"redundant_experts": 2, "stats": str(stats), "policy": "auto", "interval": 0}
    assert "EPLB R=2" in (tmp_path / "summary.md").read_text()
    # hot_ranks at target 1.8 leaves one rank with 1.8x the mean without EPLB; the placement
    # from the stats spreads the hot rank's experts (and copies) over both ranks.
    assert doc["load"]["rank_max_over_mean"] < 1.25, doc["load"]["rank_max_over_mean_per_layer"]
