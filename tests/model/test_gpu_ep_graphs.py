"""EP decode in CUDA graphs (run on the GPU machine: pytest -m gpu tests/model/test_gpu_ep_graphs.py).

The fixed-capacity dispatcher's collectives (NCCL all-gather + all-to-all) are captured in the
decode graphs; graph replay must equal the eager step:
  * at ep_size 1 with the dispatcher forced on (a size-1 NCCL group: one GPU exercises the
    capture of the collectives), and
  * at ep_size 2 (two GPUs), with uneven batches and a rank that goes idle,
for natural, greedy_balanced and skewed routing. And at ep 1 the forced path gives the local
path's logits. Ranks run in spawned processes (tests/helpers/ep_graph_worker.py), each with
NVLink multicast off.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.ep_graph_worker import forced_vs_local_rank, graph_vs_eager_rank
from tests.helpers.ep_ranks import run_on_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
POLICIES = ["natural", "greedy_balanced", "skewed"]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@pytest.fixture(autouse=True)
def _no_multicast(monkeypatch):
    for key, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        monkeypatch.setenv(key, value)  # inherited by the spawned ranks
    yield


def _check(results: list[dict], bitwise: bool) -> None:
    for rank, r in enumerate(results):
        assert r["lockstep"], (rank, r)
        assert r["no_sync"] is True, (rank, r["no_sync"])
        if bitwise:
            assert r["bitwise"], f"rank {rank}: max |eager - graph| = {r['max_diff']:.3g}"
            assert r["same_load"], (rank, r)
        else:
            assert r["same_tokens"] and r["max_diff"] < 1e-3, (rank, r)


@pytest.mark.parametrize("policy", POLICIES)
def test_forced_ep_graph_replay_is_bitwise_eager_at_ep1(policy):
    """8 sequences in the 8-bucket at Qwen3-30B-A3B width: the graph runs the eager kernels and
    collectives exactly (NCCL, one rank)."""
    _check(run_on_ranks(graph_vs_eager_rank, 1, policy, "qwen3", [8], backend="nccl"), bitwise=True)


@pytest.mark.parametrize("policy", POLICIES)
def test_forced_ep_padded_graph_replay_at_ep1(policy):
    """5 sequences in the 8-bucket (tiny fp32 model): same greedy tokens, logits within 1e-3,
    padding rows neither computed nor counted."""
    (r,) = run_on_ranks(graph_vs_eager_rank, 1, policy, "tiny", [5], 6, None, backend="nccl")
    _check([r], bitwise=False)
    assert r["tokens_counted"] == [5 * 6] * len(r["tokens_counted"])


@pytest.mark.parametrize("policy", ["natural", "greedy_balanced"])
def test_forced_ep_path_gives_the_local_paths_logits(policy):
    (r,) = run_on_ranks(forced_vs_local_rank, 1, policy, backend="nccl")
    assert r["same_tokens"] and r["max_diff"] < 1e-2, r
    assert r["bitwise"], r  # same kernels on the same rows: expected exact


@two_gpus
@pytest.mark.parametrize("policy", POLICIES)
def test_ep2_graph_replay_is_bitwise_eager(policy):
    """Both ranks at the bucket size (8 + 8): bitwise, same EP-reduced loads."""
    _check(run_on_ranks(graph_vs_eager_rank, 2, policy, "qwen3", [8, 8], backend="nccl"), bitwise=True)


@two_gpus
@pytest.mark.parametrize("policy", POLICIES)
def test_ep2_uneven_and_idle_ranks_replay_one_bucket(policy):
    """Rank 0 with 8 sequences, rank 1 with 5 that goes idle for the last two steps (it replays the
    8-bucket with padding only): same tokens as eager, padding never counted."""
    results = run_on_ranks(graph_vs_eager_rank, 2, policy, "tiny", [8, 5], 6, 1, backend="nccl")
    _check(results, bitwise=False)
    assert results[1]["rows"][-2:] == [0, 0]
    real = 8 * 6 + 5 * 4
    assert results[0]["tokens_counted"] == [real] * len(results[0]["tokens_counted"])

