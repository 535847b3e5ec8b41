"""The one Registry type behind every extensible name, and its one error format."""
from __future__ import annotations

import sys

import pytest

from server.registry import Registry, UnknownNameError, load_target


def test_register_get_aliases_and_names() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("one", 1, aliases=("uno",))

    @reg.register("two")
    def two() -> int:
        return 2

    assert reg["one"] == 1 and reg.get("uno") == 1 and reg["two"] is two
    assert reg.canonical("uno") == "one"
    assert "uno" in reg and "three" not in reg
    assert reg.names() == ["one", "two", "uno"] and list(reg) == ["one", "two"] and len(reg) == 2
    reg.register("one", 1)  # the same entry again is fine


def test_unknown_name_lists_what_exists() -> None:
    reg: Registry[int] = Registry("widget", scope="the test")
    reg.register("b", 2)
    reg.register("a", 1)
    with pytest.raises(UnknownNameError) as err:
        reg["c"]
    assert str(err.value) == "unknown widget 'c' for the test; known widgets: a, b"
    assert isinstance(err.value, KeyError) and err.value.known == ["a", "b"]
    plural = Registry("policy", plural="policies")
    assert str(plural.unknown("x")) == "unknown policy 'x'; known policies: (none)"


def test_duplicate_names_are_refused() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1, aliases=("alpha",))
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 2)
    with pytest.raises(ValueError, match="widget 'alpha' is already registered"):
        reg.register("other", 3, aliases=("alpha",))


def test_lazy_entries_import_on_first_get() -> None:
    reg: Registry = Registry("codec", lazy=True)
    reg.register("json", "json.decoder:JSONDecoder")
    reg.register("missing", "server.no_such_module:thing")
    import json.decoder

    assert reg["json"] is json.decoder.JSONDecoder
    assert "server.no_such_module" not in sys.modules  # registering imported nothing
    with pytest.raises(ModuleNotFoundError):
        reg["missing"]
    with pytest.raises(ValueError, match="package.module:attribute"):
        load_target("no_colon")


def test_discovery_runs_once_and_only_when_needed() -> None:
    calls = []
    reg: Registry[int] = Registry("plugin", discover=lambda: (calls.append(1), reg.register("late", 9)))
    reg.register("early", 1)
    assert reg["early"] == 1 and calls == []  # a known name needs no discovery
    assert reg["late"] == 9 and calls == [1]
    with pytest.raises(UnknownNameError):
        reg["never"]
    assert reg.names() == ["early", "late"] and calls == [1]


def test_the_six_registries_are_registries() -> None:
    from server.kernels.ops import KERNEL_OPS, UnknownBackendError
    from server.layers.attention import ATTENTION_BACKENDS
    from server.model.families.registry import FAMILIES, UnsupportedArchitectureError
    from server.model.spec import ModelLoadError
    from server.moe.experts import EXPERT_PATHS
    from server.moe.router import ROUTER_RULES
    from server.moe.routing.registry import POLICIES, UnknownPolicyError

    for reg in (KERNEL_OPS, ATTENTION_BACKENDS, FAMILIES, EXPERT_PATHS, ROUTER_RULES, POLICIES):
        assert isinstance(reg, Registry)
    with pytest.raises(UnknownPolicyError, match="unknown routing policy 'x'; known routing policies: .*natural"):
        POLICIES["x"]
    with pytest.raises(ModelLoadError, match="unsupported architecture 'X'; supported architectures: .*Qwen3Moe"):
        FAMILIES["X"]
    assert issubclass(UnsupportedArchitectureError, UnknownNameError)
    import server.moe.kernels.ops  # noqa: F401  (registers the MoE ops)

    with pytest.raises(UnknownBackendError, match="unknown backend 'cutlass' for fused_moe; known backends: "
                                                  "grouped_mm, torch, triton"):
        KERNEL_OPS["fused_moe"]["cutlass"]
    assert issubclass(UnknownBackendError, ValueError)
    with pytest.raises(UnknownNameError, match="unknown router rule 'sigmoid'; known router rules: sigmoid_group_topk, softmax_topk$"):
        ROUTER_RULES["sigmoid"]
    with pytest.raises(UnknownNameError, match="known expert paths: grouped_mm, torch, triton, triton_unsorted$"):
        EXPERT_PATHS["cutlass"]
    with pytest.raises(UnknownNameError, match="known attention backends: torch, triton"):
        ATTENTION_BACKENDS["flash"]
