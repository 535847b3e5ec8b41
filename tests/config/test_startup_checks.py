"""Start-up refuses a bad setting before anything listens or spawns: one paragraph naming the
key, exit code 2; misspelled keys and flags name the nearest real one; --help explains every
group and key; --version is epserve's."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _server(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", "server.port=0", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.fixture
def folder_without_weights(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    tiny = json.loads((ROOT / "server" / "assets" / "tiny" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(tiny))
    return folder


@pytest.mark.parametrize("overrides, key", [
    (["model.path=/nonexistent/checkpoint"], "model.path"),
    (["routing=skewed", "routing.target=0.5"], "routing.target"),
    (["routing=replay", "routing.path=/nonexistent/run.eptrace"], "/nonexistent/run.eptrace"),
], ids=["missing folder", "skewed target below 1", "missing trace"])
def test_bad_setting_fails_before_the_port_opens(tmp_path: Path, overrides: list[str], key: str) -> None:
    run = _server(*overrides, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert key in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "listening" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize("dry_run", [False, True], ids=["serve", "dry_run"])
def test_folder_without_weights_is_a_config_error_before_listening(tmp_path: Path, folder_without_weights: Path,
                                                                  dry_run: bool) -> None:
    run = _server(f"model.path={folder_without_weights}", f"dry_run={str(dry_run).lower()}", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "model.path" in run.stderr and "no weights" in run.stderr and "listening" not in run.stderr, run.stderr


def test_misspelled_key_names_the_real_one(tmp_path: Path) -> None:
    run = _server("server.prot=50053", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()], run.stderr
    assert "did you mean server.port" in run.stderr and "+server.prot" not in run.stderr, run.stderr


@pytest.mark.parametrize("argv, needle", [
    (["routing=skewed", "routing.targt=2"], "did you mean routing.target"),
    (["model=qwen3_30b_a3b", "model.shape.num_hidden_layer=48"], "did you mean model.shape.num_hidden_layers"),
    (["engine.max_num_seq=8"], "did you mean engine.max_num_seqs"),
])
def test_unknown_key_in_the_chosen_groups(argv: list[str], needle: str) -> None:
    from server.command_line import unknown_key

    assert needle in unknown_key(argv)


@pytest.mark.parametrize("argv", [["server.port=1"], ["routing=skewed", "routing.target=3"], ["+routing.extra=1"],
                                  ["model=qwen3_30b_a3b", "model.shape.num_hidden_layers=48"], ["~server.tls_key"]])
def test_existing_or_added_keys_pass(argv: list[str]) -> None:
    from server.command_line import unknown_key

    assert unknown_key(argv) is None


def test_unknown_flag_is_one_paragraph() -> None:
    from server.command_line import unknown_flag

    assert "did you mean --cfg" in unknown_flag(["--cgf", "job"])
    assert "--bogus: no such option" in unknown_flag(["--bogus"])
    assert unknown_flag(["--cfg", "job", "-p", "server", "routing=natural"]) is None


def test_version_is_epserves(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "server", "--version"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version"))
    assert run.returncode == 0 and run.stdout.strip() == f"epserve {version}", run.stdout + run.stderr


def test_help_lists_group_options_and_what_each_key_means() -> None:
    from server.command_help import help_text
    from server.command_line import CONF_DIR

    page = help_text("epserve", CONF_DIR, "config", ["routing=skewed"])
    assert "routing=  fake_balance, greedy_balanced, natural, " in page and "skewed*" in page
    assert "routing.mode=zipf    # zipf | lognormal | hot_ranks" in page
    assert "server.port=50051    # gRPC port" in page
    assert "engine.overlap=true    # plan step n+1 while step n runs" in page
    keys = [line for line in page.splitlines() if line.startswith("  ") and "=" in line and "." in line.split("=")[0]]
    bare = [line for line in keys if "#" not in line]
    assert len(keys) > 50 and not bare, bare


def test_bench_help_lists_the_groups_it_takes_from_the_server_conf(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "server.bench", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("epserve-bench ")
    assert "qwen3_30b_a3b*" in run.stdout and "routing=  fake_balance, greedy_balanced" in run.stdout
    assert re.search(r"^  bench\.mode=engine    # ", run.stdout, re.M), run.stdout
