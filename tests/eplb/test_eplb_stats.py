"""EPLB statistics files and their builders, and the parallel.* EPLB settings."""
from __future__ import annotations

import json

import pytest
import torch

from server.config import AppConfig, ConfigError, ParallelConfig
from server.moe.eplb.build_stats import main as build_stats_main
from server.moe.eplb.build_stats import policy_expert_load, trace_expert_load
from server.moe.eplb.settings import EplbConfigError, resolve_eplb
from server.moe.eplb.stats import StatsFileError, read_expert_load, write_expert_load
from server.moe.routing import build_policy
from server.moe.routing.trace_file import TraceHeader, TraceWriter


def test_stats_round_trip_and_accepted_layouts(tmp_path) -> None:
    rows = [[3, 0, 1, 2], [1, 1, 1, 5]]
    path = write_expert_load(tmp_path / "s.json", rows, source="hand")
    assert json.loads(path.read_text())["source"] == "hand"
    assert read_expert_load(path, num_layers=2, num_experts=4) == rows
    layouts = {
        "bare": rows,
        "client": {"num_layers": 2, "layers": [{"layer": i, "expert_tokens": r} for i, r in enumerate(rows)]},
        "bench": {"schema": "epserve-bench/1", "load": {"rank_max_over_mean": 1.2, "expert_tokens": rows}},
    }
    for name, data in layouts.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        assert read_expert_load(tmp_path / f"{name}.json") == rows, name


@pytest.mark.parametrize("content,match", [
    ("{", "not valid JSON"),
    ('{"other": 1}', "expected key 'expert_tokens'"),
    ("[]", "non-empty"),
    ("[[1, -2]]", "layer 0, expert 1: -2"),
    ('[[1, "x"]]', "layer 0, expert 1"),
    ("[[1, 2], [1]]", "different expert counts"),
])
def test_bad_stats_files_are_named(tmp_path, content, match) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(StatsFileError, match=match):
        read_expert_load(path)


def test_stats_shape_must_match_the_model(tmp_path) -> None:
    path = write_expert_load(tmp_path / "s.json", [[1, 2, 3, 4]] * 3, source="x")
    with pytest.raises(StatsFileError, match="has 3 MoE layers, the model has 2"):
        read_expert_load(path, num_layers=2, num_experts=4)
    with pytest.raises(StatsFileError, match="does not exist"):
        read_expert_load(tmp_path / "nope.json")


def test_policy_stats_follow_the_policy() -> None:
    policy = build_policy("skewed", mode="zipf", target=3.0)
    loads = policy_expert_load(policy, num_layers=2, num_experts=16, top_k=2, ep_size=2, tokens_per_rank=2048, chunk=1000)
    assert [sum(r) for r in loads] == [2 * 2048 * 2] * 2
    from server.moe.routing import RoutingContext

    for layer, row in enumerate(loads):
        p = policy.probabilities(RoutingContext(layer=layer, num_experts=16, top_k=2, ep_size=2))
        assert max(range(16), key=row.__getitem__) == max(range(16), key=p.__getitem__)  # the hot expert
        assert max(row) * 16 / sum(row) == pytest.approx(3.0, rel=0.05)


def test_trace_stats_sum_the_ranks_files(tmp_path) -> None:
    for rank, ids in enumerate(([[0, 1], [0, 2]], [[3, 0]])):
        writer = TraceWriter(tmp_path / f"t.rank{rank}.eptrace", TraceHeader(4, 2, "uint8", rank, 2))
        ids_t = torch.tensor(ids, dtype=torch.int32)
        writer.write_block([(0, 0, len(ids)), (0, 1, len(ids))], torch.cat([ids_t, ids_t.flip(1)]))
        writer.close()
    loads, source = trace_expert_load(str(tmp_path / "t.rank{rank}.eptrace"), ep_size=2)
    assert loads == [[3, 1, 1, 1], [3, 1, 1, 1]] and "t.rank1.eptrace" in source


def test_build_stats_cli(tmp_path, capsys) -> None:
    out = tmp_path / "skewed.json"
    code = build_stats_main(["policy", "--model", "conf/model/tiny.yaml", "--ep-size", "2", "--routing", "name=skewed",
                             "target=2.5", "mode=zipf", "--tokens", "512", "-o", str(out)])
    assert code == 0
    loads = read_expert_load(out, num_layers=4, num_experts=16)  # the embedded tiny model's shape
    assert [sum(r) for r in loads] == [2 * 512 * 2] * 4
    assert "skewed" in json.loads(out.read_text())["source"]
    code = build_stats_main(["policy", "--model", "conf/model/tiny.yaml", "--ep-size", "2", "--routing", "name=no_such",
                             "-o", str(tmp_path / "x.json")])
    assert code == 2 and "unknown routing policy 'no_such'" in capsys.readouterr().err


def test_parallel_keys_are_validated() -> None:
    for key, value, match in [("redundant_experts", -1, "parallel.redundant_experts must be an integer >= 0"),
                              ("eplb_interval", 1.5, "parallel.eplb_interval"),
                              ("eplb_policy", "best", "parallel.eplb_policy='best'"),
                              ("eplb_stats", "", "parallel.eplb_stats")]:
        with pytest.raises(ConfigError, match=match):
            AppConfig.from_dict({"parallel": {key: value}})
    assert not ParallelConfig().eplb_enabled and ParallelConfig(eplb_interval=5).eplb_enabled


def test_settings_against_the_model(tmp_path, monkeypatch) -> None:
    assert resolve_eplb(ParallelConfig(ep_size=2), num_layers=2, num_experts=8, ep_size=2) is None
    with pytest.raises(EplbConfigError, match=r"8 experts \+ parallel.redundant_experts=2 = 10 .* parallel.ep_size=4"):
        resolve_eplb(ParallelConfig(ep_size=4, redundant_experts=2), num_layers=2, num_experts=8, ep_size=4)
    with pytest.raises(EplbConfigError, match="parallel.eplb_num_groups=3 does not divide"):
        resolve_eplb(ParallelConfig(ep_size=4, redundant_experts=4, eplb_num_groups=3, eplb_policy="hierarchical"),
                     num_layers=2, num_experts=8, ep_size=4)
    with pytest.raises(EplbConfigError, match="parallel.eplb_num_nodes=3 does not divide"):
        resolve_eplb(ParallelConfig(ep_size=4, redundant_experts=4, eplb_num_nodes=3), num_layers=2, num_experts=8, ep_size=4)
    with pytest.raises(EplbConfigError, match="needs parallel.eplb_num_nodes=2 to divide parallel.eplb_num_groups=1"):
        resolve_eplb(ParallelConfig(ep_size=4, redundant_experts=4, eplb_num_nodes=2, eplb_policy="hierarchical"),
                     num_layers=2, num_experts=8, ep_size=4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 4 ranks, 2 per node -> 2 nodes
    s = resolve_eplb(ParallelConfig(ep_size=4, redundant_experts=4, eplb_num_groups=4), num_layers=2, num_experts=8, ep_size=4)
    assert (s.num_nodes, s.num_groups, s.redundant_experts) == (2, 4, 4)
    placement = s.initial_placement(2, 8, 4)  # even loads: copies of the first experts of each node
    assert placement.num_slots == 12 and placement.slots_per_rank == 3


def test_dry_run_checks_and_prints_the_eplb_plan(tmp_path, capsys) -> None:
    from server.dry_run import dry_run

    app = AppConfig.from_dict({"parallel": {"ep_size": 2, "redundant_experts": 2, "eplb_interval": 50}})
    assert dry_run(app) == 0
    assert "EPLB: 16+2 expert slots per layer placed from even loads (auto), rebalanced every 50 steps" in capsys.readouterr().out
    stats = write_expert_load(tmp_path / "s.json", [[1] * 8] * 4, source="wrong width")
    app = AppConfig.from_dict({"parallel": {"ep_size": 2, "eplb_stats": str(stats)}})
    assert dry_run(app) == 2
    assert "parallel.eplb_stats" in capsys.readouterr().err
