"""Registry: decorator, aliases, parameter checks, lazy entry-point plugins."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.moe.routing import (
    PolicyConfigError,
    RoutingContext,
    RoutingPolicy,
    UnknownPolicyError,
    available_policies,
    build_policy,
    canonical_name,
    register_policy,
)

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugins" / "epserve-reverse-policy"


def test_alias_resolves_to_greedy() -> None:
    assert canonical_name("fake_balance") == "greedy_balanced"
    assert type(build_policy("fake_balance")).name == "greedy_balanced"


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownPolicyError) as err:
        build_policy("no_such_policy")
    message = str(err.value)
    for name in ("natural", "greedy_balanced", "fake_balance", "round_robin_balanced", "uniform_random", "skewed"):
        assert name in message


def test_unknown_parameter_is_named() -> None:
    with pytest.raises(PolicyConfigError, match="bogus"):
        build_policy("round_robin_balanced", bogus=1)
    with pytest.raises(PolicyConfigError, match="weights"):
        build_policy("natural", weights="sometimes")


def test_decorator_registers_name_and_alias() -> None:
    @register_policy("test_identity_policy", aliases=("test_identity_alias",))
    class IdentityPolicy(RoutingPolicy):
        def route(self, topk_ids, topk_weights, router_logits, ctx):
            return topk_ids.int()

    assert "test_identity_policy" in available_policies()
    policy = build_policy("test_identity_alias", weights="uniform")
    ids = torch.tensor([[1, 2]], dtype=torch.int32)
    out, w = policy(ids, torch.tensor([[0.7, 0.3]]), torch.zeros(1, 4), RoutingContext(layer=0, num_experts=4, top_k=2))
    assert torch.equal(out, ids) and torch.allclose(w, torch.tensor([[0.5, 0.5]]))


def test_duplicate_name_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        @register_policy("greedy_balanced")
        class Impostor(RoutingPolicy):
            pass


def test_decorator_refuses_non_policies() -> None:
    with pytest.raises(TypeError):
        register_policy("not_a_policy")(lambda *a: a)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """pip-install the out-of-tree plugin package kept under tests/plugins into a private dir."""
    site = tmp_path_factory.mktemp("plugin_site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target", str(site), str(PLUGIN)],
        check=True,
    )
    return site


def _env_with(site: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_plugin_discovered_through_entry_point(plugin_site: Path) -> None:
    code = (
        "import torch\n"
        "from server.moe.routing import build_policy, available_policies, RoutingContext\n"
        "assert 'reverse_expert' in available_policies()\n"
        "p = build_policy('reverse_expert', shift=1)\n"
        "ids, _ = p(torch.tensor([[0, 3]], dtype=torch.int32), torch.ones(1, 2), torch.zeros(1, 8), RoutingContext(layer=0, num_experts=8, top_k=2))\n"
        "print(ids.tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env_with(plugin_site), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[[0, 5]]"


def test_plugin_selected_from_hydra_command_line(plugin_site: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "dry_run=true", "routing.name=reverse_expert", "+routing.shift=3"],
        env=_env_with(plugin_site), capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "reverse_expert(weights='keep', seed=0, shift=3)" in out.stdout


def test_unknown_policy_from_command_line_fails_with_names() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "dry_run=true", "routing.name=does_not_exist"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert out.returncode == 2
    assert "does_not_exist" in out.stderr and "greedy_balanced" in out.stderr
    assert "Traceback" not in out.stderr
