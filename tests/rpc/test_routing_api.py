"""Routing as a live part of the API, against the real server in a subprocess: switching the
policy under load, balanced load right after a switch, routed experts per token equal to what
routing=record writes, and who may switch (PERMISSION_DENIED / UNAUTHENTICATED / bad names)."""
from __future__ import annotations

import threading

import pytest
import torch

from clients import Client, FinishReason, NO_RETRY, errors
from server.moe.routing import RoutingContext, build_policy
from server.moe.routing.trace_file import read_trace
from tests.helpers.server_process import ServerProcess

TOKEN = "routing-test-token"


@pytest.fixture(scope="module")
def switchable(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("routing"), "server.allow_routing_switch=true",
                       "engine.max_num_batched_tokens=2048") as srv:
        yield srv


def test_switch_under_load_every_stream_completes(switchable):
    new_tokens, results, errors_seen = 24, {}, []

    def run(i: int) -> None:
        try:
            with Client(switchable.target, timeout=120) as c:
                results[i] = c.generate([3 + i, 7, 11, 13 + i], max_new_tokens=new_tokens, ignore_eos=True,
                                        temperature=0.7, seed=i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors_seen.append(exc)

    with Client(switchable.target, timeout=120) as c:
        assert c.routing_policy().name == "natural"
        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        seen = []
        for name in ("natural", "fake_balance", "round_robin_balanced"):
            info = c.set_routing_policy(name)
            seen.append(info.name)
            assert c.routing_policy() == info and c.info().routing == info
        for t in threads:
            t.join(120)
    assert not errors_seen, errors_seen
    assert seen == ["natural", "greedy_balanced", "round_robin_balanced"]  # the alias answers its canonical name
    assert len(results) == 6
    for out in results.values():
        assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == new_tokens


def test_flapping_switch_with_natural_at_both_ends_keeps_greedy_tokens(switchable):
    """Switches land between steps on every rank and change nothing else: greedy streams that run
    while the policy is switched again and again (natural each time: every switch still resets
    counters and swaps the policy object) produce the tokens a run without switches produces, and
    after natural -> greedy_balanced -> natural the same prompts give those tokens again."""
    prompts = [[3 + i, 7, 11, 13 + i, 17, 19 + 2 * i] for i in range(6)]
    new_tokens, results, errors_seen = 24, {}, []

    def greedy(c: Client, prompt: list[int]) -> list[int]:
        return list(c.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).token_ids)

    def run(i: int) -> None:
        try:
            with Client(switchable.target, timeout=120) as c:
                results[i] = greedy(c, prompts[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors_seen.append(exc)

    with Client(switchable.target, timeout=120) as c:
        c.set_routing_policy("natural")
        reference = [greedy(c, p) for p in prompts]
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for seed in range(1, 9):
            assert c.set_routing_policy("natural", seed=seed).name == "natural"
        for t in threads:
            t.join(120)
        assert not errors_seen, errors_seen
        assert [results[i] for i in range(len(prompts))] == reference
        assert c.set_routing_policy("greedy_balanced").name == "greedy_balanced"
        assert greedy(c, prompts[0]) != reference[0] or greedy(c, prompts[1]) != reference[1]  # it did switch
        assert c.set_routing_policy("natural").name == "natural"
        assert [greedy(c, p) for p in prompts] == reference


def test_long_prefill_after_a_switch_is_balanced(switchable):
    with Client(switchable.target, timeout=120) as c:
        model = c.info()
        before = c.routing_policy()
        info = c.set_routing_policy("greedy_balanced", seed=3)
        assert info.name == "greedy_balanced" and info.params["seed"] == 3 and "±1" in info.guarantee
        assert info.counters_reset_unix_s > before.counters_reset_unix_s and info.since_engine_step >= before.since_engine_step
        fresh = c.expert_load()
        assert all(layer.tokens == 0 for layer in fresh.layers) and fresh.seconds_since_reset < 60  # the switch reset them
        prompt, new = [5 + (i * 7) % 200 for i in range(1500)], 4
        c.generate(prompt, max_new_tokens=new, ignore_eos=True)
        load = c.expert_load(reset=True)
    steps = 1 + (new - 1)  # one prefill step, then a decode step per token fed back
    for layer in load.layers:
        assert layer.tokens == len(prompt) + new - 1
        mean = layer.tokens * model.top_k / model.num_experts
        # greedy: within ±1 per expert in each call -> max <= mean + one per step
        assert layer.expert_max_over_mean <= (mean + steps) / mean, layer
        assert layer.expert_balancedness >= mean / (mean + steps)
    assert load.expert_balancedness["min"] >= 0.95


def test_unknown_name_or_bad_params_are_refused_and_change_nothing(switchable):
    with Client(switchable.target, timeout=60, retry=NO_RETRY) as c:
        before = c.routing_policy()
        with pytest.raises(errors.InvalidRequestError) as exc:
            c.set_routing_policy("no_such_policy")
        assert "no_such_policy" in exc.value.details and "greedy_balanced" in exc.value.details  # the registry's list
        with pytest.raises(errors.InvalidRequestError, match="bogus"):
            c.set_routing_policy("round_robin_balanced", bogus=1)
        with pytest.raises(errors.InvalidRequestError, match="target"):
            c.set_routing_policy("skewed", target=0.5)
        assert c.routing_policy() == before
        out = c.generate([1, 2, 3], max_new_tokens=3, ignore_eos=True)  # still serving
        assert len(out.token_ids) == 3


HOSTILE_SWITCHES = [  # (name, params, what the refusal names)
    ("uniform_random", {"seed": 1e20}, "params.seed"),  # these four once wedged the server: the
    ("greedy_balanced", {"seed": 2**64}, "params.seed"),  # switch could not be packed for the engine
    ("round_robin_balanced", {"seed": -(2**70)}, "params.seed"),  # core and stayed queued, so every
    ("skewed", {"mode": "hot_ranks", "hot_ranks": 1e30}, "params.hot_ranks"),  # later call timed out
    ("skewed", {"target": float("nan")}, "params.target"),
    ("skewed", {"target": float("inf")}, "params.target"),
    ("uniform_random", {"seed": 2**53 + 2}, "params.seed"),  # rounded on the wire already
    ("uniform_random", {"seed": "7" * 300}, "params.seed"),
    ("uniform_random", {f"k{i}": i for i in range(65)}, "params"),
    ("skewed", {"mode": "hot_ranks", "hot_ranks": 4}, "hot_ranks"),  # fits the wire; the policy refuses it
    ("x" * 65, {}, "name"),
]


@pytest.mark.parametrize("name, params, field", HOSTILE_SWITCHES,
                         ids=[f"{n[:20]}-{'-'.join(p)[:30]}" for n, p, _ in HOSTILE_SWITCHES])
def test_out_of_range_parameters_are_refused_and_the_server_keeps_serving(switchable, name, params, field):
    """Every parameter is judged before the switch is queued: INVALID_ARGUMENT naming it,
    nothing changed, and the next calls are served at once."""
    with Client(switchable.target, timeout=10, retry=NO_RETRY) as c:
        before = c.routing_policy()
        with pytest.raises(errors.InvalidRequestError) as exc:
            c.set_routing_policy(name, **params)
        assert field in exc.value.details.split(":")[0], exc.value.details
        assert c.routing_policy() == before
        assert len(c.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True).token_ids) == 2
        assert c.set_routing_policy("uniform_random", seed=2**53).params["seed"] == 2**53  # the edge is accepted
        assert c.set_routing_policy(before.name, **before.params) == c.routing_policy()
        assert c.health() == "SERVING"


def test_a_live_switch_cannot_write_or_read_files(switchable, tmp_path):
    """record and replay would write or read whatever file `path` names with the server's
    rights (overwrite a file, fill /dev/full, learn whether a file exists and what it holds).
    A live switch takes no path and cannot select a policy that uses files: each attempt is
    INVALID_ARGUMENT, the answer does not depend on the file, nothing is touched, and the
    server keeps serving (a directory or /dev/full used to make the next step kill it)."""
    victim = tmp_path / "victim.bin"
    victim.write_bytes(bytes(range(256)) * 4)
    before_stat = victim.stat()
    attempts = [
        ("record", {"path": str(victim)}), ("record", {"path": str(victim), "flush_tokens": 1}),
        ("record", {"path": str(tmp_path)}), ("record", {"path": "/dev/full", "flush_tokens": 1}),
        ("record", {"path": str(tmp_path / "new.eptrace"), "flush_tokens": 1e15}),
        ("replay", {"path": str(victim), "layout": "routed_experts", "num_layers": 2, "top_k": 2}),
        ("replay", {"path": str(tmp_path / "missing.u16"), "layout": "routed_experts", "num_layers": 2, "top_k": 2}),
        ("natural", {"path": str(victim)}),
        ("record", {}), ("replay", {}),
    ]
    with Client(switchable.target, timeout=10, retry=NO_RETRY) as c:
        before = c.routing_policy()
        answers = []
        for name, params in attempts:
            with pytest.raises(errors.InvalidRequestError) as exc:
                c.set_routing_policy(name, **params)
            answers.append(exc.value.details)
            assert c.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        assert c.routing_policy() == before and c.health() == "SERVING"
    assert all(a.startswith("params.path: a live switch takes no file path") for a in answers[:8]), answers
    assert all(a.startswith("routing.name:") and "live switch" in a for a in answers[8:]), answers
    # the same answer whether the file exists or not, and nothing from inside it
    assert answers[5].replace(str(victim), "P") == answers[6].replace(str(tmp_path / "missing.u16"), "P")
    assert victim.read_bytes() == bytes(range(256)) * 4 and victim.stat().st_mtime_ns == before_stat.st_mtime_ns
    assert not (tmp_path / "new.eptrace").exists()


def test_routed_experts_shape_and_prompt_rows(switchable):
    with Client(switchable.target, timeout=60) as c:
        model = c.info()
        prompt = list(range(10, 30))
        plain = c.generate(prompt, max_new_tokens=5, ignore_eos=True)
        assert plain.routed_experts is None
        out = c.generate(prompt, max_new_tokens=5, ignore_eos=True, return_routed_experts=True)
        assert len(out.routed_experts) == 5
        assert out.prompt_routed_experts is None and out.completion_routed_experts == out.routed_experts[1:]
        assert all(len(row) == model.num_moe_layers and all(len(ids) == model.top_k for ids in row)
                   for row in out.routed_experts)
        with_prompt = []
        with c.stream(prompt, max_new_tokens=5, ignore_eos=True, return_routed_experts=True, include_prompt=True) as s:
            for chunk in s:
                with_prompt.extend(chunk.routed_experts or [])
        assert len(with_prompt) == len(prompt) + 5 - 1
        assert with_prompt[len(prompt) - 1:] == out.routed_experts  # the same positions, the same policy
        for row in with_prompt:
            for ids in row:
                assert len(set(ids)) == model.top_k and all(0 <= e < model.num_experts for e in ids)


def test_routed_experts_equal_what_record_writes(tmp_path):
    path = tmp_path / "run.eptrace"
    prompt, new = [2, 9, 4, 17, 33, 5, 8, 21, 40, 3, 6], 7
    with ServerProcess(tmp_path, "routing=record", f"routing.path={path}") as srv:
        with Client(srv.target, timeout=120) as c:
            model = c.info()
            out = c.generate(prompt, max_new_tokens=new, ignore_eos=True, return_routed_experts=True,
                             include_prompt=True)
    assert srv.proc.returncode == 0, srv.log()
    rows = len(prompt) + new - 1  # every position the model ran
    got = torch.tensor(out.routed_experts, dtype=torch.int32)  # [rows, L, k]
    assert got.shape == (rows, model.num_moe_layers, model.top_k)
    # vLLM's layout: one row per prompt token [P, L, k], then the fed-back generated tokens [C - 1, L, k]
    prompt_rows = torch.tensor(out.prompt_routed_experts, dtype=torch.int32)
    completion_rows = torch.tensor(out.completion_routed_experts, dtype=torch.int32)
    assert prompt_rows.shape == (len(prompt), model.num_moe_layers, model.top_k)
    assert completion_rows.shape == (new - 1, model.num_moe_layers, model.top_k)
    assert torch.equal(torch.cat([prompt_rows, completion_rows]), got)
    trace = read_trace(path)
    for layer in range(model.num_moe_layers):
        assert torch.equal(trace.layers[layer][-rows:], got[:, layer]), layer
    # the same bytes replayed: routing=replay reads the RoutedExperts layout back
    captured = tmp_path / "captured.u16"
    captured.write_bytes(got.numpy().astype("<u2").tobytes())
    replay = build_policy("replay", path=str(captured), layout="routed_experts", num_layers=model.num_moe_layers,
                          top_k=model.top_k)
    replay.validate(model.num_experts, model.top_k, 1, model.num_moe_layers)
    for layer in range(model.num_moe_layers):
        ctx = RoutingContext(layer=layer, num_experts=model.num_experts, top_k=model.top_k)
        ids, _ = replay(torch.zeros(rows, model.top_k, dtype=torch.int32), torch.ones(rows, model.top_k),
                        torch.zeros(rows, model.num_experts), ctx)
        assert torch.equal(ids, got[:, layer])


def test_switching_needs_the_flag_and_the_token(tmp_path):
    with ServerProcess(tmp_path, f"server.auth_token={TOKEN}", wait_ready=False) as srv:
        srv.wait_ready(token=TOKEN)
        with Client(srv.target, token=TOKEN, timeout=30, retry=NO_RETRY) as c:
            with pytest.raises(errors.AuthenticationError) as exc:
                c.set_routing_policy("greedy_balanced")
            assert exc.value.code == "PERMISSION_DENIED" and "allow_routing_switch" in exc.value.details
            assert c.routing_policy().name == "natural"
        with Client(srv.target, token=None, timeout=30, retry=NO_RETRY) as c:
            for call in (lambda: c.set_routing_policy("greedy_balanced"), c.routing_policy):
                with pytest.raises(errors.AuthenticationError) as exc:
                    call()
                assert exc.value.code == "UNAUTHENTICATED"


def test_switching_with_auth_on_needs_the_token(tmp_path):
    with ServerProcess(tmp_path, f"server.auth_token={TOKEN}", "server.allow_routing_switch=true",
                       wait_ready=False) as srv:
        srv.wait_ready(token=TOKEN)
        with Client(srv.target, token=None, timeout=30, retry=NO_RETRY) as c:
            with pytest.raises(errors.AuthenticationError) as exc:
                c.set_routing_policy("greedy_balanced")
            assert exc.value.code == "UNAUTHENTICATED"
        with Client(srv.target, token=TOKEN, timeout=30, retry=NO_RETRY) as c:
            assert c.routing_policy().name == "natural"
            assert c.set_routing_policy("greedy_balanced").name == "greedy_balanced"


def _cli(srv, *args: str):
    import subprocess
    import sys

    from tests.helpers.server_process import ROOT

    return subprocess.run([sys.executable, "-m", "clients", "--target", srv.target, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_routing_set_get_and_routed_experts(switchable):
    import json

    run = _cli(switchable, "routing", "set", "fake_balance", "seed=2", "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["name"] == "greedy_balanced" and doc["params"]["seed"] == 2 and doc["counters_reset_unix_s"] > 0
    run = _cli(switchable, "routing")
    assert run.returncode == 0 and "greedy_balanced" in run.stdout and "guarantee" in run.stdout, run.stderr
    run = _cli(switchable, "routing", "set", "no_such_policy")
    assert run.returncode == 1 and "INVALID_ARGUMENT" in run.stderr
    run = _cli(switchable, "generate", "--ids", "1,2,3", "--max-new-tokens", "3", "--ignore-eos", "--routed-experts",
               "--json")
    assert run.returncode == 0, run.stderr
    routed = json.loads(run.stdout)["routed_experts"]
    with Client(switchable.target) as c:
        model = c.info()
    assert len(routed) == 3 and all(len(row) == model.num_moe_layers for row in routed)


def test_async_client_switches_and_returns_routed_experts(switchable):
    import asyncio

    from clients import AsyncClient

    async def main():
        async with AsyncClient(switchable.target) as c:
            info = await c.set_routing_policy("round_robin_balanced")
            assert info == await c.routing_policy()
            out = await c.generate([4, 5, 6, 7], max_new_tokens=2, ignore_eos=True, return_routed_experts=True,
                                   include_prompt=True)
            return info, out

    info, out = asyncio.run(main())
    assert info.name == "round_robin_balanced" and len(out.routed_experts) == 4 + 2 - 1
