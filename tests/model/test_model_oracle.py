"""Our sharded-EP model vs transformers, per family, at ep_size 1, 2 and 4 (CPU, fp32, gloo).

* routing=natural: every step's logits match a plain transformers forward within 1e-4.
  At ep 2/4 through both EP dispatchers: the fixed-capacity all-gather (every policy) and the
  variable-split all-to-all (natural).
* balanced policies: logits match a dense reference built from transformers' modules that
  applies the same rewritten ids and weights (tests/helpers/dense_reference.py), and the
  EP-reduced load counters match the ids that reference routed.
The scenario (tests/helpers/scenario.py) mixes prompt lengths, a chunked prefill, late
arrivals, an early finish, and ranks with no tokens. Ranks for ep 2/4 are spawned once per
ep size for all families and policies.
"""
from __future__ import annotations

import pytest
import torch

from server.config import ModelConfig
from server.model.loader import load_model, read_model_spec
from server.moe.routing import build_policy
from tests.helpers.dense_reference import run_dense_reference
from tests.helpers.ep_ranks import run_on_ranks
from tests.helpers.hf_models import FAMILIES, build_hf_model, hf_sequence_logits, save_hf_model
from tests.helpers.oracle_worker import oracle_rank
from tests.helpers.scenario import expected_positions, full_sequences, make_scenario, run_scenario

POLICIES = ["natural", "greedy_balanced", "round_robin_balanced"]
EP_SIZES = [1, 2, 4]
ATOL = 1e-4
VOCAB = 96


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (transformers model, saved folder)."""
    out = {}
    for i, family in enumerate(FAMILIES):
        hf = build_hf_model(family, seed=i)
        out[family] = (hf, str(save_hf_model(hf, tmp_path_factory.mktemp(family))))
    return out


@pytest.fixture(scope="module")
def scenario():
    return make_scenario(VOCAB)


@pytest.fixture(scope="module")
def hf_step_logits(checkpoints, scenario):
    """family -> {(step, seq): logits} from full-sequence transformers forwards."""
    positions = expected_positions(scenario)
    out = {}
    for family, (hf, _) in checkpoints.items():
        per_seq = {sid: hf_sequence_logits(hf, toks) for sid, toks in full_sequences(scenario).items()}
        out[family] = {key: per_seq[key[1]][pos] for key, pos in positions.items()}
    return out


@pytest.fixture(scope="module")
def ep_runs(checkpoints, scenario):
    """ep -> {(family, policy[, "alltoall"]): (logits by (step, seq) merged over ranks, expert_tokens,
    per-rank bytes)}; the key without a dispatcher name ran parallel.dispatch=allgather (ep > 1)
    or the local path (ep 1)."""
    cache: dict[int, dict] = {}

    def get(ep: int) -> dict:
        if ep not in cache:
            default = ("allgather",) if ep > 1 else ()
            cases = [(f"{f}/{p}", folder, p, VOCAB, *default) for f, (_, folder) in checkpoints.items() for p in POLICIES]
            if ep > 1:
                cases += [(f"{f}/natural/alltoall", folder, "natural", VOCAB, "alltoall")
                          for f, (_, folder) in checkpoints.items()]
            if ep == 1:  # in-process: no process group at ep 1; one thread, like the spawned ranks
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    ranks = [oracle_rank(0, 1, cases)]
                finally:
                    torch.set_num_threads(threads)
            else:
                ranks = run_on_ranks(oracle_rank, ep, cases)
            merged = {}
            for key, *_ in cases:
                logits = {}
                for rank_result in ranks:
                    logits.update(rank_result[key][0])
                counts = ranks[0][key][1]
                assert all(r[key][1] == counts for r in ranks), "ranks disagree on the reduced load counters"
                merged[tuple(key.split("/"))] = (logits, counts, [(r[key][2], r[key][3]) for r in ranks])
            cache[ep] = merged
        return cache[ep]

    return get


def _max_err(got: dict, want: dict) -> float:
    assert set(got) == set(want), f"steps/sequences differ: {sorted(set(got) ^ set(want))}"
    return max((got[k] - want[k]).abs().max().item() for k in want)


@pytest.mark.parametrize("ep,dispatch", [(1, None), (2, None), (4, None), (2, "alltoall"), (4, "alltoall")])
@pytest.mark.parametrize("family", FAMILIES)
def test_natural_matches_transformers(family, ep, dispatch, ep_runs, hf_step_logits):
    """dispatch None: the local path at ep 1, the fixed-capacity all-gather at ep 2/4."""
    logits, _, _ = ep_runs(ep)[(family, "natural") + ((dispatch,) if dispatch else ())]
    assert _max_err(logits, hf_step_logits[family]) < ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_reference_matches_transformers_under_natural(family, checkpoints, scenario, hf_step_logits):
    """The reference used for balanced policies is itself exact when nothing is rewritten."""
    hf, folder = checkpoints[family]
    spec = read_model_spec(ModelConfig(path=folder))
    ref, _ = run_dense_reference(hf, build_policy("natural"), scenario, 1, spec.sliding_windows)
    assert _max_err(ref, hf_step_logits[family]) < ATOL


@pytest.mark.parametrize("ep", EP_SIZES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_policy_matches_dense_reference(family, policy, ep, ep_runs, checkpoints, scenario, hf_step_logits):
    hf, folder = checkpoints[family]
    spec = read_model_spec(ModelConfig(path=folder))
    ref, ref_counts = run_dense_reference(hf, build_policy(policy), scenario, ep, spec.sliding_windows)
    logits, counts, _ = ep_runs(ep)[(family, policy)]
    assert _max_err(logits, ref) < ATOL
    assert counts == ref_counts.tolist()  # the load counters saw exactly the ids the reference routed
    if policy != "natural":  # the rewrite really changed the model's output
        assert _max_err(logits, hf_step_logits[family]) > 1e-2


@pytest.mark.parametrize("ep", [2, 4])
def test_each_rank_holds_and_reads_its_share_of_experts(ep, ep_runs, checkpoints):
    for family in FAMILIES:
        spec = read_model_spec(ModelConfig(path=checkpoints[family][1]))
        total = spec.expert_param_count() * 4  # float32 checkpoint, float32 model
        for held, read in ep_runs(ep)[(family, "natural")][2]:
            assert held == read == total // ep


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, checkpoints):
    hf, folder = checkpoints[family]
    prompt = [5, 17, 42, 8, 77, 3]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                       pad_token_id=0)[0, len(prompt):].tolist()
    model = load_model(ModelConfig(path=folder), policy=build_policy("natural"))
    from tests.helpers.paged_driver import PagedDriver

    driver = PagedDriver(model)
    got, feed = [], prompt
    for _ in range(8):
        token = int(driver.step([(0, feed)])[0].argmax())
        got.append(token)
        feed = [token]
    assert got == want


def test_ep1_runs_the_whole_scenario_in_process(checkpoints, scenario):
    """Sanity of the harness: ep 1 covers every (step, seq) of the scenario."""
    _, folder = checkpoints["qwen3_moe"]
    model = load_model(ModelConfig(path=folder), policy=build_policy("natural"))
    assert set(run_scenario(model, scenario)) == set(expected_positions(scenario))
