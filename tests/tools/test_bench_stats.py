"""The experiment's statistics and its balance bound, on numbers worked out by hand."""
from __future__ import annotations

import pytest

from server.bench.bound import ProbeStep, balance_bound, uplift_over_bound
from server.bench.stats import bootstrap_median_ci, describe, paired_ratios, ratio_of_medians_ci


def test_describe_reports_median_ci_and_spread() -> None:
    d = describe([100.0, 104.0, 98.0, 101.0, 120.0])
    assert d["median"] == 101.0 and d["min"] == 98.0 and d["max"] == 120.0 and d["n"] == 5
    assert d["spread_rel"] == pytest.approx(22 / 101)
    lo, hi = d["ci95"]
    assert 98.0 <= lo <= 101.0 <= hi <= 120.0
    assert d["ci_half_width_rel"] == pytest.approx((hi - lo) / 2 / 101)
    assert describe([7.0])["ci95"] == [7.0, 7.0]
    assert bootstrap_median_ci([1.0, 2.0, 3.0, 4.0], seed=3) == bootstrap_median_ci([1.0, 2.0, 3.0, 4.0], seed=3)
    with pytest.raises(ValueError):
        describe([1.0, float("nan")])


def test_pairing_by_repetition_cancels_drift_the_unpaired_ratio_keeps() -> None:
    drift = [1.0, 0.8, 1.2, 0.9, 1.1, 0.75]  # the machine's speed, round by round
    natural = [100 * d for d in drift]
    policy = [110 * d for d in drift]  # 10% faster than natural in every round
    paired = describe(paired_ratios(policy, natural))
    assert paired["median"] == pytest.approx(1.1) and paired["ci95"] == pytest.approx([1.1, 1.1])
    unpaired = ratio_of_medians_ci(policy, natural)
    assert unpaired["ratio"] == pytest.approx(1.1)
    assert unpaired["ci95"][0] < 1.0 < 1.2 < unpaired["ci95"][1]  # drift swamps the effect without pairing
    with pytest.raises(ValueError, match="repetitions"):
        paired_ratios([1.0, 2.0], [1.0])


def test_bound_replaces_the_busiest_ranks_pairs_by_the_mean() -> None:
    # one step of 1 s, half of it MoE (2 layers x 250 ms); rank 0 computes 30 pairs, rank 1 10
    step = ProbeStep(moe_ms=[250.0, 250.0], rank_pairs=[[30, 10], [30, 10]])
    b = balance_bound([step], phase_s=1.0)
    assert b["moe_share"] == pytest.approx(0.5) and b["rank_max_over_mean"] == pytest.approx(1.5)
    assert b["us_per_pair"] == pytest.approx(0.5 / 60 * 1e6)
    # balanced: 40 pairs at the same rate -> MoE 1/3 s, the step 5/6 s
    assert b["balanced_moe_s"] == pytest.approx(1 / 3) and b["speedup_bound"] == pytest.approx(1.2)
    two = balance_bound([step, ProbeStep(moe_ms=[100.0, 100.0], rank_pairs=[[20, 20], [20, 20]])], phase_s=2.0)
    assert two["pairs_busiest_rank"] == 100 and two["pairs_mean_rank"] == 80
    assert two["speedup_bound"] == pytest.approx(2.0 / (2.0 - 0.7 + 0.7 * 80 / 100))
    one_rank = balance_bound([ProbeStep(moe_ms=[400.0], rank_pairs=[[64]])], phase_s=1.0)
    assert one_rank["speedup_bound"] == pytest.approx(1.0)  # a single rank is always balanced


def test_uplift_over_bound() -> None:
    v = uplift_over_bound(1.1, 1.2)
    assert v["uplift"] == pytest.approx(0.1) and v["uplift_over_bound"] == pytest.approx(0.5)
    assert v["ratio_over_bound"] == pytest.approx(1.1 / 1.2)
    assert uplift_over_bound(0.97, 1.0)["uplift_over_bound"] is None  # no gain to be had
