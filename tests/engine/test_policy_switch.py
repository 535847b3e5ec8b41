"""Switching the routing policy in place through a step plan's `routing` field: the rank then
generates exactly what a rank started with that policy generates, at ep 1 and ep 2 (gloo),
policies are built once and reused, and a bad mapping is a ConfigError naming the key."""
from __future__ import annotations

import pytest
import torch

from server.config import AppConfig, ConfigError
from server.worker.distributed import RankGroups
from server.worker.rank import build_runner
from server.engine.api import SamplingParams, StopParams
from server.core.step_io import EngineRequest
from server.core.scheduler import Scheduler
from server.core.sequence import Sequence
from server.launch_plan import build_launch_plan
from tests.helpers.ep_ranks import run_on_ranks

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [40, 41, 42, 43]]
BLOCK = 4
ROUND_ROBIN = {"name": "round_robin_balanced"}


def _app(ep_size: int, routing: str) -> AppConfig:
    return AppConfig.from_dict({"model": {"name": "tiny"}, "routing": {"name": routing}, "parallel": {"ep_size": ep_size},
                                "engine": {"kv_cache_tokens": 256, "kv_block_size": BLOCK, "max_num_seqs": 4}})


def _runner(app: AppConfig, rank: int, world: int, groups=None):
    return build_runner(build_launch_plan(app, world), rank, torch.device("cpu"), groups)


def _generate(runner, rank: int, world: int, steps: int, routing: dict | None = None):
    """Greedy prefill + decode of PROMPTS, planned by a scheduler of our own (every rank builds
    the same one, so all run the same plans; the first step carries the switch) -> (tokens per
    prompt, the switched-to repr, the load counters summed over ranks)."""
    import torch.distributed as dist

    sched = Scheduler(num_ranks=world, num_blocks=64, block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=64,
                      max_queue=8)
    seqs = []
    for i, p in enumerate(PROMPTS):
        req = EngineRequest(i, tuple(p), SamplingParams(temperature=0.0), StopParams(max_new_tokens=steps, ignore_eos=True))
        seqs.append(Sequence.create(i, req, 0, len(p) + steps, 0.0))
        sched.add(seqs[-1])
    switched = None
    for step in range(steps):
        plan = sched.plan()
        if step == 0 and routing is not None:
            plan = plan.with_routing(routing)
        result = runner.run(plan.ranks[rank])
        switched = switched or result.routing
        results = [result]
        if world > 1:
            results = [None] * world
            dist.all_gather_object(results, result)
        sched.update(plan, results)
    tokens = [s.token_ids[len(p):] for s, p in zip(seqs, PROMPTS)]
    assert all(len(t) == steps for t in tokens)
    return tokens, switched, runner.model.load_counters.snapshot(runner.ep_group if world > 1 else None)


def test_switching_in_place_generates_what_a_fresh_rank_generates() -> None:
    runner = _runner(_app(1, "natural"), 0, 1)
    natural = runner.model.policy
    switched_tokens, name, load = _generate(runner, 0, 1, steps=5, routing=ROUND_ROBIN)
    assert name.startswith("round_robin_balanced(") and runner.model.policy.name == "round_robin_balanced"
    fresh_tokens, none, fresh_load = _generate(_runner(_app(1, "round_robin_balanced"), 0, 1), 0, 1, steps=5)
    assert none is None and switched_tokens == fresh_tokens and load == fresh_load
    natural_tokens, _, natural_load = _generate(_runner(_app(1, "natural"), 0, 1), 0, 1, steps=5)
    assert load.expert_tokens != natural_load.expert_tokens  # the switch did change the routing
    # switching back restores the very object the rank started with; aliases share one policy
    assert runner.policies.switch({"name": "natural"}) is None and runner.model.policy is natural
    assert runner.policies.policy_for({"name": "fake_balance"}) is runner.policies.policy_for({"name": "greedy_balanced"})


def test_a_bad_mapping_is_a_config_error_and_leaves_the_policy() -> None:
    runner = _runner(_app(1, "natural"), 0, 1)
    before = runner.model.policy
    with pytest.raises(ConfigError, match="routing.name"):
        runner.policies.switch({"name": "no_such_policy"})
    with pytest.raises(ConfigError, match="target"):
        runner.policies.switch({"name": "skewed", "target": 0.5})
    assert runner.model.policy is before


def _ep2_rank(rank: int, world: int):
    import torch.distributed as dist

    torch.manual_seed(0)
    groups = RankGroups(rank, world, dist.group.WORLD, dist.group.WORLD)
    switched = _generate(_runner(_app(world, "natural"), rank, world, groups), rank, world, 4, ROUND_ROBIN)
    fresh = _generate(_runner(_app(world, "round_robin_balanced"), rank, world, groups), rank, world, 4)
    return switched, fresh


def test_every_ep_rank_switches_in_the_same_step() -> None:
    results = run_on_ranks(_ep2_rank, 2)
    for (tokens, name, load), (fresh_tokens, _, fresh_load) in results:
        assert name.startswith("round_robin_balanced(")
        assert tokens == fresh_tokens and load == fresh_load  # the MoE all-to-alls saw one policy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_graphs_are_captured_per_policy_and_reused(monkeypatch) -> None:
    def cuda_runner():
        return build_runner(build_launch_plan(_app(1, "natural"), 1), 0, torch.device("cuda"), None)

    runner = cuda_runner()
    first = runner.decode_graphs
    assert first is not None and first.policy is runner.model.policy
    graph_tokens, _, _ = _generate(runner, 0, 1, steps=6, routing=ROUND_ROBIN)
    assert runner.decode_graphs is not first and runner.decode_graphs.policy is runner.model.policy
    assert runner.policies.switch({"name": "natural"}) is first  # back: the first capture, not a new one
    monkeypatch.setenv("EPSERVE_CUDA_GRAPHS", "0")
    eager = cuda_runner()
    assert eager.decode_graphs is None
    eager_tokens, _, _ = _generate(eager, 0, 1, steps=6, routing=ROUND_ROBIN)
    assert graph_tokens == eager_tokens


def _core_app(ep_size: int) -> AppConfig:
    return AppConfig.from_dict({"model": {"name": "tiny"}, "parallel": {"ep_size": ep_size},
                                "engine": {"kv_cache_tokens": 512, "kv_block_size": 16, "max_num_seqs": 8,
                                           "max_num_batched_tokens": 512}})


def _step_until(core, done, max_steps: int = 8):
    """Step until `done(outputs)` (an overlapped core answers a step later) -> those outputs."""
    for _ in range(max_steps):
        out = core.step()
        if done(out):
            return out
    raise AssertionError(f"nothing answered within {max_steps} steps")


def _prefill_load(core, prompts) -> list[list[int]]:
    """One step over `prompts` with the load counters reset: that step's [layer][expert] counts."""
    from server.engine.api import SamplingParams, StopParams
    from server.core.step_io import EngineRequest

    ticket = core.request_expert_load(reset=True)
    _step_until(core, lambda out: ticket in out.load_tickets)  # clears the counters
    ids = {1000 + i for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        core.add_request(EngineRequest(1000 + i, tuple(p), SamplingParams(temperature=0.0), StopParams(max_new_tokens=1)))
    ticket = core.request_expert_load(reset=True)
    out = _step_until(core, lambda out: ticket in out.load_tickets)
    assert set(out.finished) == ids
    return out.expert_load.expert_tokens


@pytest.mark.parametrize("ep_size", [1, 2])
def test_engine_core_switches_every_rank_before_the_next_forward(ep_size) -> None:
    from server.core.startup import build_engine_core

    core = build_engine_core(_core_app(ep_size))
    try:
        prompts = [list(range(3 + i, 40 + i)) for i in range(4)]
        natural = _prefill_load(core, prompts)
        assert any(max(row) - min(row) > 1 for row in natural)  # the router leaves experts uneven
        with pytest.raises(ConfigError, match="routing.name"):
            core.switch_routing_policy({"name": "no_such_policy"})
        core.switch_routing_policy(ROUND_ROBIN)
        assert core.has_work()
        out = _step_until(core, lambda out: out.routing is not None)  # an otherwise idle step carries it to every rank
        assert out.routing.startswith("round_robin_balanced(") and not out.is_empty
        assert core.model_info().routing_policy == "round_robin_balanced"
        balanced = _prefill_load(core, prompts)
        # round robin: within one pick per expert in the step, summed over ranks — only if every rank switched
        assert all(max(row) - min(row) <= 1 for row in balanced), balanced
    finally:
        core.shutdown(graceful=True)


def test_a_rank_keeps_few_policies_and_releases_a_recorder_when_switched_away(tmp_path) -> None:
    """Callers choose the mappings (a seed per switch), so what a rank keeps must be bounded:
    at most KEEP_POLICIES built policies. A policy that uses files is released the moment the
    rank leaves it: its trace is complete and its descriptor closed (150 record switches used to
    leave 150 descriptors open until the server ran out)."""
    import os
    from pathlib import Path

    from server.worker.policy_switch import KEEP_POLICIES, refuse_file_policies
    from server.moe.routing.trace_file import read_trace

    runner = _runner(_app(1, "natural"), 0, 1)
    for seed in range(3 * KEEP_POLICIES):
        runner.policies.switch({"name": "uniform_random", "seed": seed})
        assert runner.policies.kept_policies <= KEEP_POLICIES
    path = tmp_path / "t.eptrace"
    record = {"name": "record", "path": str(path)}
    _generate(runner, 0, 1, steps=2, routing=record)
    recorder = runner.model.policy

    def descriptors_on_trace() -> int:
        return sum(1 for fd in Path("/proc/self/fd").iterdir() if os.path.realpath(fd) == str(path.resolve()))

    assert recorder.name == "record" and descriptors_on_trace() == 1
    runner.policies.switch({"name": "natural"})
    assert descriptors_on_trace() == 0
    assert read_trace(path).layers[0].shape[0] == sum(map(len, PROMPTS)) + len(PROMPTS)  # prefill + 1 decode step
    assert runner.policies.policy_for(record) is not recorder  # forgotten: a new one if asked again
    with pytest.raises(ConfigError, match="live switch"):
        refuse_file_policies(record)
    with pytest.raises(ConfigError, match="live switch"):
        refuse_file_policies({"name": "replay"})
    refuse_file_policies({"name": "uniform_random", "seed": 3})  # no file: nothing to refuse
