"""epserve-eval on the shipped tiny model: natural routing is really imbalanced, the balanced
policies reach their guaranteed balance, fidelity means what it says, and the natural
perplexity is transformers' teacher-forced perplexity on the same held-out windows."""
from __future__ import annotations

import json
import math

import pytest
import torch

from server.eval.cli import main, parse_policy
from server.model.loader import TINY_MODEL_DIR
from server.eval.corpus import heldout_windows, load_corpus

ARGS = ["--num-seqs", "8", "--seq-len", "64", "--seqs-per-rank", "1", "--ep-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    main([*ARGS, "--out", str(out), "--policies", "natural", "greedy_balanced", "round_robin_balanced",
          "uniform_random", "skewed:target=2.5", "optimal_balanced", "rank_balanced", "rank_balanced:tolerance=0.25"])
    data = json.loads((out / "policies.json").read_text())
    def key(label: str) -> str:  # 'skewed(target=2.5)' -> 'skewed'; the loose rank_balanced keeps its tolerance
        return "rank_balanced:0.25" if label == "rank_balanced(tolerance=0.25)" else label.split("(")[0]

    return out, data, {key(row["policy"]): row for row in data["policies"]}


def test_writes_table_json_and_png(results):
    out, data, rows = results
    assert (out / "policies.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "policies.md").read_text()
    assert "| natural |" in table and "| greedy_balanced |" in table and "skewed(target=2.5)" in table
    assert data["setup"]["tokens_per_rank_call"] == 64 and data["setup"]["ep_size"] == 4


def test_natural_is_imbalanced_and_faithful(results):
    _, _, rows = results
    natural = rows["natural"]
    assert natural["fidelity"] == 1.0 and natural["perplexity_vs_natural"] == 0.0
    assert natural["expert_max_over_mean"] > 1.2
    assert natural["rank_max_over_mean"] > 1.0


def test_balanced_policies_reach_their_guarantee(results):
    """64 tokens x top-2 per call over 16 experts is a whole number per expert, so ±1 means exact."""
    _, _, rows = results
    for name in ("greedy_balanced", "round_robin_balanced"):
        row = rows[name]
        assert row["expert_max_over_mean"] == 1.0 and row["step_expert_max_over_mean"] == 1.0, name
        assert row["rank_max_over_mean"] == 1.0, name
        assert row["fidelity"] < 1.0
    assert rows["greedy_balanced"]["fidelity"] > rows["round_robin_balanced"]["fidelity"]
    assert rows["uniform_random"]["expert_max_over_mean"] > 1.0  # balanced only in expectation
    assert rows["round_robin_balanced"]["mean_ranks_per_token"] == 2.0  # a token's 2 experts on 2 ranks


def test_capacity_policies_balance_and_keep_more(results):
    """optimal_balanced: greedy's exact balance, more of the router kept, lower perplexity;
    rank_balanced: exact rank balance with experts free; both beside their exact optimum."""
    out, _, rows = results
    optimal, rank, loose = rows["optimal_balanced"], rows["rank_balanced"], rows["rank_balanced:0.25"]
    assert optimal["expert_max_over_mean"] == 1.0 and optimal["step_expert_max_over_mean"] == 1.0
    assert optimal["fidelity"] > rows["greedy_balanced"]["fidelity"]
    assert optimal["perplexity"] < rows["greedy_balanced"]["perplexity"]
    assert rank["rank_max_over_mean"] == 1.0 and rank["expert_max_over_mean"] > 1.0
    assert rank["fidelity"] > optimal["fidelity"]
    assert 1.0 < loose["rank_max_over_mean"] <= 1.25 and loose["fidelity"] > rank["fidelity"]
    for row in (optimal, rank, loose):
        assert row["fallback_calls"] == 0
        assert row["objective_per_pair"] <= row["optimum_objective_per_pair"] + 1e-4
        assert 0.0 <= row["objective_gap"] < 0.01
    assert "exact optimum" in (out / "policies.md").read_text()
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_natural_perplexity_is_transformers_perplexity(results):
    from transformers import AutoModelForCausalLM

    _, data, rows = results
    meta = json.loads((TINY_MODEL_DIR / "training.json").read_text()) if (TINY_MODEL_DIR / "training.json").is_file() else {}
    permille = meta.get("config", {}).get("heldout_permille", 50)
    windows = heldout_windows(load_corpus(permille).heldout, 64, 8)  # [8, 65]
    hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR).eval()
    with torch.no_grad():
        logits = hf(input_ids=windows[:, :-1]).logits  # [8, 64, V]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())
    assert abs(rows["natural"]["perplexity"] - math.exp(float(nll))) < 1e-3 * math.exp(float(nll))


def test_record_then_replay_in_the_eval(tmp_path):
    trace = tmp_path / "natural.eptrace"
    args = [*ARGS, "--ep-size", "1", "--seqs-per-rank", "2"]
    main([*args, "--out", str(tmp_path / "a"), "--policies", "natural", f"record:path={trace}"])
    main([*args, "--out", str(tmp_path / "b"), "--policies", "natural", f"replay:path={trace},advance=true"])
    a = json.loads((tmp_path / "a" / "policies.json").read_text())["policies"]
    b = json.loads((tmp_path / "b" / "policies.json").read_text())["policies"]
    assert a[0]["perplexity"] == a[1]["perplexity"] == b[0]["perplexity"] == b[1]["perplexity"]
    assert b[1]["fidelity"] == 1.0 and b[1]["expert_tokens"] == a[0]["expert_tokens"]


def test_policy_specs_and_errors():
    assert parse_policy("skewed:target=3,mode=hot_ranks") == ("skewed", {"target": 3, "mode": "hot_ranks"})
    assert parse_policy("replay:path=/x.eptrace,advance=true") == ("replay", {"path": "/x.eptrace", "advance": True})
    with pytest.raises(SystemExit, match="unknown routing policy 'nope'"):
        main([*ARGS, "--policies", "nope"])
    with pytest.raises(SystemExit, match="routing.target"):
        main([*ARGS, "--policies", "skewed:target=50"])
    with pytest.raises(SystemExit, match="--ep-size 1"):
        main([*ARGS, "--policies", "record:path=/tmp/x{rank}.eptrace"])


def test_tradeoff_curve_holds_the_tolerance_steps_only() -> None:
    """The curve joins natural and rank_balanced at its tolerances; a bonus or an expert cap is
    another kind of point (drawn apart, not joined into the curve)."""
    from server.eval.tradeoff import curve_points

    rows = [{"policy": p, "rank_max_over_mean": x} for p, x in [
        ("natural", 1.9), ("greedy_balanced", 1.0), ("rank_balanced", 1.0), ("rank_balanced(tolerance=0.1)", 1.1),
        ("rank_balanced(expert_cap=1.5)", 1.0), ("rank_balanced(keep_bonus=1)", 1.0)]]
    assert [r["policy"] for r in curve_points(rows)] == ["rank_balanced", "rank_balanced(tolerance=0.1)", "natural"]
