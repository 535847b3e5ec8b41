"""Hydra composition, frozen validated config, start-up errors, what --cfg prints."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from server.config import AppConfig, ConfigError
from server.routing_setup import build_routing_policy

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_fake_balance_composes_like_greedy_balanced() -> None:
    assert composed("routing=fake_balance") == composed("routing=greedy_balanced")
    assert composed("routing=fake_balance")["routing"]["name"] == "greedy_balanced"


@pytest.mark.parametrize("routing", ["natural", "greedy_balanced", "fake_balance", "round_robin_balanced", "uniform_random", "skewed",
                                     "optimal_balanced", "rank_balanced"])
@pytest.mark.parametrize("parallel", ["single", "ep2", "ep4", "ep8"])
def test_every_group_option_validates(routing: str, parallel: str) -> None:
    app = AppConfig.from_dict(composed(f"routing={routing}", f"parallel={parallel}"))
    policy = build_routing_policy(app.routing, num_experts=64, top_k=4, ep_size=app.parallel.ep_size)
    assert policy.name == ("greedy_balanced" if routing == "fake_balance" else routing)


def test_config_is_frozen() -> None:
    app = AppConfig.from_dict(composed())
    with pytest.raises(Exception):
        app.parallel.ep_size = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        app.routing.params["weights"] = "uniform"  # type: ignore[index]


@pytest.mark.parametrize(
    "overrides,expect",
    [
        (["model.dtype=float64"], "model.dtype"),
        (["model.quantization=fp8"], "model.quantization"),
        (["parallel.ep_size=0"], "parallel.ep_size"),
        (["parallel.backend=mpi"], "parallel.backend"),
        (["server.host=0.0.0.0"], "server.allow_remote"),
        (["server.tls_cert=/x.pem"], "server.tls_key"),
        (["engine.max_num_seqs=0"], "engine.max_num_seqs"),
        (["+model.bogus=1"], "model.bogus"),
    ],
)
def test_impossible_settings_name_the_key(overrides: list[str], expect: str) -> None:
    with pytest.raises(ConfigError, match=expect.replace(".", r"\.")):
        AppConfig.from_dict(composed(*overrides))


def test_model_shape_checks_name_the_keys() -> None:
    app = AppConfig.from_dict(composed("parallel.ep_size=3"))
    with pytest.raises(ConfigError, match="parallel.ep_size=3"):
        build_routing_policy(app.routing, num_experts=64, top_k=4, ep_size=3)
    with pytest.raises(ConfigError, match="top-k"):
        build_routing_policy(app.routing, num_experts=4, top_k=8, ep_size=1)
    skewed = AppConfig.from_dict(composed("routing=skewed", "routing.target=20"))
    with pytest.raises(ConfigError, match="routing.target"):
        build_routing_policy(skewed.routing, num_experts=64, top_k=8, ep_size=1)


def test_dispatch_settings_are_checked_at_start_up() -> None:
    from server.dispatch_setup import build_dispatch_settings, needs_group_at_ep1

    default = AppConfig.from_dict(composed("parallel=ep2"))
    settings = build_dispatch_settings(default.parallel, default.engine, 2)
    assert settings.name == "auto"  # every step the scheduler can plan takes the fixed-capacity path
    assert settings.fixed_max_rows == default.engine.max_num_batched_tokens + default.engine.max_num_seqs
    forced = AppConfig.from_dict(composed("parallel.dispatch=allgather", "parallel.dispatch_fixed_max_rows=64"))
    assert needs_group_at_ep1(build_dispatch_settings(forced.parallel, forced.engine, 1))
    assert build_dispatch_settings(forced.parallel, forced.engine, 1).fixed_max_rows == 64
    assert not needs_group_at_ep1(build_dispatch_settings(AppConfig.from_dict(composed()).parallel, forced.engine, 1))
    wrong = AppConfig.from_dict(composed("parallel.dispatch=deepep"))
    with pytest.raises(ConfigError, match="parallel.dispatch='deepep' is not one of .*allgather"):
        build_dispatch_settings(wrong.parallel, wrong.engine, 1)
    local = AppConfig.from_dict(composed("parallel=ep2", "parallel.dispatch=local"))
    with pytest.raises(ConfigError, match="parallel.dispatch=local"):
        build_dispatch_settings(local.parallel, local.engine, 2)
    with pytest.raises(ConfigError, match="parallel.dispatch_fixed_max_rows"):
        AppConfig.from_dict(composed("parallel.dispatch_fixed_max_rows=-1"))


def test_dispatch_wire_is_checked_at_start_up() -> None:
    """parallel.dispatch_wire: bf16 (default) | fp8; fp8 needs the fixed-capacity path and a
    hidden size made of whole 128-channel scale groups. Each error names the key and the value."""
    from server.dispatch_setup import build_dispatch_settings
    from server.moe.dispatch import WIRES

    default = AppConfig.from_dict(composed("parallel=ep2"))
    assert build_dispatch_settings(default.parallel, default.engine, 2, hidden_size=96).wire == "bf16"
    for wire in WIRES:  # the config's list and the dispatcher's agree
        assert AppConfig.from_dict(composed(f"parallel.dispatch_wire={wire}")).parallel.dispatch_wire == wire
    with pytest.raises(ConfigError, match=r"parallel\.dispatch_wire='fp16' is not one of \('bf16', 'fp8'\)"):
        AppConfig.from_dict(composed("parallel.dispatch_wire=fp16"))
    fp8 = AppConfig.from_dict(composed("parallel=ep2", "parallel.dispatch_wire=fp8"))
    assert build_dispatch_settings(fp8.parallel, fp8.engine, 2, hidden_size=7168).wire == "fp8"
    with pytest.raises(ConfigError, match="parallel.dispatch_wire=fp8 .* hidden_size 96 is not a multiple of 128"):
        build_dispatch_settings(fp8.parallel, fp8.engine, 2, hidden_size=96)
    alltoall = AppConfig.from_dict(composed("parallel=ep2", "parallel.dispatch=alltoall", "parallel.dispatch_wire=fp8"))
    with pytest.raises(ConfigError, match="parallel.dispatch=alltoall never sends FP8 rows"):
        build_dispatch_settings(alltoall.parallel, alltoall.engine, 2, hidden_size=7168)


def test_cfg_job_prints_greedy_for_fake_balance(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "--cfg", "job", "routing=fake_balance"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert OmegaConf.create(out.stdout).routing.name == "greedy_balanced"
    assert list(tmp_path.iterdir()) == [], "Hydra must not write outputs/ or change directory"


def test_bad_setting_exits_with_one_paragraph(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "model.dtype=float64"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2
    assert "model.dtype" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.5.6.7", True), ("localhost", True), ("::1", True),
                                           ("[::1]", True), ("127.example.com", False), ("0.0.0.0", False), ("10.0.0.1", False)])
def test_loopback_detection(host: str, loopback: bool) -> None:
    from server.config import is_loopback

    assert is_loopback(host) is loopback
    if not loopback:
        with pytest.raises(ConfigError, match="allow_remote"):
            AppConfig.from_dict(composed(f"server.host={host}"))


def test_default_limits_make_max_concurrent_streams_reachable() -> None:
    """With the shipped defaults (and the dataclass defaults), the engine holds more requests
    than the server admits calls, so a caller meets server.max_concurrent_streams (one message
    naming it) rather than the engine's queue; and one connection cannot hold every call."""
    for app in (AppConfig.from_dict(composed()), AppConfig()):
        engine_room = app.engine.max_num_seqs * app.parallel.ep_size + app.engine.max_queue
        assert engine_room >= app.server.max_concurrent_streams, (engine_room, app.server.max_concurrent_streams)
        assert app.server.max_calls_per_connection < app.server.max_concurrent_streams


SECRET = "tok-3f9a a long token with spaces that YAML would fold over two lines when it prints it wide"


@pytest.mark.parametrize("flags", [["--cfg", "job"], ["--cfg", "all"], ["--cfg", "job", "--package", "server"],
                                   ["--cfg", "job", "--package", "server.auth_token"], ["--help"], ["--info", "config"]],
                         ids=" ".join)
def test_printed_config_redacts_the_auth_token(tmp_path: Path, flags: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", *flags, f"server.auth_token='{SECRET}'"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert "tok-3f9a" not in out.stdout and "fold over" not in out.stdout and "<redacted>" in out.stdout
    if flags[:2] == ["--cfg", "job"] and len(flags) == 2:
        cfg = OmegaConf.create(out.stdout)  # still YAML, the rest untouched
        assert cfg.server.auth_token == "<redacted>" and cfg.server.auth_token_env is None and cfg.server.port == 50051


def test_printed_config_keeps_an_unset_token_null(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "server", "--cfg", "job"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and OmegaConf.create(out.stdout).server.auth_token is None


@pytest.mark.parametrize("override, options", [("routing=nope", "fake_balance, greedy_balanced, natural"),
                                               ("parallel=ep3", "ep2, ep4, ep8, single"),
                                               ("+model=nope", "mixtral_8x7b")])
def test_unknown_group_option_is_one_paragraph_and_exit_2(tmp_path: Path, override: str, options: str) -> None:
    out = subprocess.run([sys.executable, "-m", "server", override], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    group, option = override.lstrip("+").split("=")
    assert f"config group '{group}' has no option '{option}'" in out.stderr and options in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_yaml_defaults_are_the_dataclass_defaults() -> None:
    """The composed defaults (what --cfg job shows) and the frozen dataclasses' defaults (what
    AppConfig.from_dict fills in) are the same settings; ep2/ep4/ep8 differ from single in
    ep_size alone."""
    from dataclasses import replace

    from server.config import EngineConfig, KernelConfig, ParallelConfig, ServerConfig

    app = AppConfig.from_dict(composed())
    assert (app.parallel, app.engine, app.kernels, app.server) == (ParallelConfig(), EngineConfig(), KernelConfig(),
                                                                  ServerConfig())
    for n in (2, 4, 8):
        assert AppConfig.from_dict(composed(f"parallel=ep{n}")).parallel == replace(ParallelConfig(), ep_size=n)
