"""The launch plan: built once from the config, it travels to the ranks whole (pickled), and the
backend choices are config keys whose environment overrides are applied, named and checked."""
from __future__ import annotations

import logging
import pickle

import pytest

from server.config import AppConfig, ConfigError
from server.launch_plan import build_launch_plan


def _app(**sections) -> AppConfig:
    return AppConfig.from_dict({"routing": {"name": "skewed", "target": 2.0, "mode": "hot_ranks", "seed": 3},
                                "parallel": {"ep_size": 2}, **sections})


def test_the_plan_resolves_every_choice_once_and_pickles_whole(monkeypatch) -> None:
    for env in ("EPSERVE_KERNEL_BACKEND", "EPSERVE_EXPERT_PATH", "EPSERVE_MLA_DECODE", "EPSERVE_MLA_PREFILL",
                "EPSERVE_CUDA_GRAPHS"):
        monkeypatch.delenv(env, raising=False)
    plan = build_launch_plan(_app(model={"max_model_len": 10**6}))
    assert (plan.ep_size, plan.spec.num_experts, plan.policy.name, plan.eplb, plan.dispatch.name) == (2, 16, "skewed", None, "auto")
    assert plan.max_model_len == plan.spec.max_position_embeddings < 10**6 and plan.overrides == ()
    shipped = pickle.loads(pickle.dumps(plan))
    assert shipped.app == plan.app and shipped.spec == plan.spec and repr(shipped.policy) == repr(plan.policy)


def test_an_environment_override_is_applied_and_logged(monkeypatch, caplog) -> None:
    monkeypatch.setenv("EPSERVE_KERNEL_BACKEND", "torch")
    monkeypatch.setenv("EPSERVE_CUDA_GRAPHS", "0")
    with caplog.at_level(logging.WARNING, logger="server.launch_plan"):
        plan = build_launch_plan(_app(kernels={"mla_decode": "dense"}))
    assert (plan.kernels.backend, plan.kernels.cuda_graphs, plan.kernels.mla_decode) == ("torch", False, "dense")
    assert plan.overrides == ("EPSERVE_KERNEL_BACKEND=torch overrides kernels.backend='auto'",
                              "EPSERVE_CUDA_GRAPHS=0 overrides kernels.cuda_graphs=True")
    assert [r.getMessage() for r in caplog.records] == list(plan.overrides)


@pytest.mark.parametrize("kernels, env, key", [
    ({"backend": "cutlass"}, {}, "kernels.backend='cutlass'"),
    ({}, {"EPSERVE_EXPERT_PATH": "nope"}, "kernels.expert_path='nope' (or EPSERVE_EXPERT_PATH)"),
    ({"mla_decode": "flash"}, {}, "kernels.mla_decode='flash'"),
    ({}, {"EPSERVE_MLA_PREFILL": "dense"}, "kernels.mla_prefill='dense' (or EPSERVE_MLA_PREFILL)"),
])
def test_a_backend_that_does_not_exist_is_a_config_error(monkeypatch, kernels, env, key) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        build_launch_plan(_app(kernels=kernels))


def test_the_fp8_wire_is_checked_against_the_models_hidden_size() -> None:
    """The plan reads the spec, so a hidden size the fp8 wire cannot group stops start-up."""
    import json
    from pathlib import Path

    plan = build_launch_plan(_app(parallel={"ep_size": 2, "dispatch_wire": "fp8"}))  # the tiny model: H=128
    assert plan.dispatch.wire == "fp8" and "dispatch auto (fp8 rows on the all-gather)" in plan.describe()
    shape = json.loads((Path(__file__).resolve().parents[2] / "server/assets/tiny/config.json").read_text())
    shape["hidden_size"] = 192
    with pytest.raises(ConfigError, match="parallel.dispatch_wire=fp8 .* hidden_size 192 is not a multiple of 128"):
        build_launch_plan(_app(model={"shape": shape}, parallel={"ep_size": 2, "dispatch_wire": "fp8"}))


def test_impossible_parallel_settings_fail_in_the_plan() -> None:
    with pytest.raises(ConfigError, match="ep_size=3 does not divide"):
        build_launch_plan(_app(), ep_size=3)
    with pytest.raises(ConfigError, match="parallel.dispatch=local"):
        build_launch_plan(AppConfig.from_dict({"parallel": {"ep_size": 2, "dispatch": "local"}}))
