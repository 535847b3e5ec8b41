"""The model's GPU path on CPU: Triton attention + fused MoE + the decode-graph runner's static
buffers, run under Triton's interpreter (EPSERVE_KERNEL_BACKEND=triton) in a fresh process and
compared with the torch path. The CUDA-only parts (capture, replay, no host sync) are in
tests/model/test_gpu_graphs.py, marked gpu."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def _run(case: str, timeout_s: float = 300, **params) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", EPSERVE_KERNEL_BACKEND="triton")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.gpu_path_worker", case, json.dumps(params)],
                          capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("policy,family", [("natural", "tiny"), ("natural", "deepseek")])
def test_kernel_path_matches_torch_path(policy, family):
    """Prefill + 3 greedy decode steps of the tiny model (and of a small DeepSeek-V3: MLA latent
    kernels, grouped router): logits within 1e-3, same tokens, same loads, and the kernel path
    really ran (KernelAttentionMetadata)."""
    result = _run("paths_agree", policy=policy, family=family)
    assert result["ok"], result


@pytest.mark.parametrize("policy,family", [("round_robin_balanced", "tiny"), ("greedy_balanced", "tiny"),
                                           ("greedy_balanced", "deepseek")])
def test_graph_runner_padding_is_invisible(policy, family):
    """3 sequences padded to the 4-bucket: real rows' logits match model.forward, padding writes
    no KV (no latent row either) and is not counted, and a 0-d tensor token_offset routes like the int one."""
    result = _run("graph_runner_static", policy=policy, family=family)
    assert result["ok"], result
    assert result["tokens"] == [3] * len(result["tokens"])


def test_engine_step_buffers_feed_the_graph_runner():
    """The engine's runner fills its own step buffers (padding rows included) and replays decode
    graphs over them, decode inputs gathered from the slots' last sampled tokens on the device:
    the same tokens as the eager path, bucket after bucket as sequences finish."""
    result = _run("engine_graph_replay")
    assert result["ok"], result
    assert [len(t) for t in result["graphs"]] == [3, 5, 7]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ep_graph_runner_replays_one_bucket_on_every_rank():
    """ep 2 over gloo, fixed-capacity dispatch, static-buffer graphs (capture off):
      * the graph runner alone: both ranks run the 4-bucket (rank 0 with 3 real rows, rank 1 with
        1, then rank 1 idle): real rows match eager unpadded steps, loads count no padding;
      * the engine's ModelRunner on a scheduler's plans (chunked prefill, uneven and idle ranks,
        a step rank 0 cannot replay and runs eagerly padded to the others' bucket): the same
        tokens as a ModelRunner without graphs."""
    result = _run("ep_graph_runner_static", timeout_s=840, ep=2, policy="greedy_balanced")
    assert result["ok"], result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ep_graph_gpu_helper_dry_run_at_ep2():
    """The rank side of tests/model/test_gpu_ep_graphs.py on CPU (gloo, interpreter, capture off):
    rank 0 with 4 sequences, rank 1 with 3 that goes idle, skewed routing: both replay the
    4-bucket, the runner's steps equal the eager ones padded to it, no padding counted."""
    from tests.helpers.ep_graph_worker import graph_vs_eager_rank
    from tests.helpers.ep_ranks import run_on_ranks

    results = run_on_ranks(graph_vs_eager_rank, 2, "skewed", "tiny", [4, 3], 3, 1)
    for r in results:
        assert r["lockstep"] and r["same_tokens"] and r["same_load"] and r["max_diff"] < 1e-4, r
    assert results[1]["rows"] == [3, 0, 0]
    assert results[0]["tokens_counted"] == [4 * 3 + 3 * 1] * len(results[0]["tokens_counted"])


def test_graphs_refuse_what_they_cannot_capture():
    """Buckets cover every batch size; a dispatcher needing host-side splits and non-kernel attention
    say why they stay eager."""
    from server.config import ModelConfig
    from server.model.gpu.cuda_graphs import DecodeGraphRunner, GraphsUnsupported, bucket_sizes, maybe_decode_graphs
    from server.model.loader import load_model
    from server.moe.routing import build_policy

    assert bucket_sizes(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert bucket_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert bucket_sizes(1) == [1]
    cpu = load_model(ModelConfig(), policy=build_policy("natural"))
    kv = cpu.allocate_kv_cache(8, 16)
    with pytest.raises(GraphsUnsupported, match="Triton kernels"):
        DecodeGraphRunner(cpu, kv, max_batch=4, max_blocks_per_seq=4, capture=False)
    assert maybe_decode_graphs(cpu, kv, max_batch=4, max_blocks_per_seq=4) is None
    from server.moe.dispatch import DispatchSettings

    ep2 = load_model(ModelConfig(), policy=build_policy("natural"), ep_rank=0, ep_size=2,
                     dispatch=DispatchSettings("alltoall"))
    with pytest.raises(GraphsUnsupported, match="ep_size=2, parallel.dispatch=alltoall"):
        DecodeGraphRunner(ep2, ep2.allocate_kv_cache(8, 16), max_batch=4, max_blocks_per_seq=4, capture=False)
    # the fixed-capacity path is graph-safe up to its row bound; beyond it, auto takes the variable splits
    auto = load_model(ModelConfig(), policy=build_policy("natural"), ep_rank=0, ep_size=2,
                      dispatch=DispatchSettings("auto", fixed_max_rows=4))
    with pytest.raises(GraphsUnsupported, match="Triton kernels"):  # EP is no longer the reason (CPU is)
        DecodeGraphRunner(auto, auto.allocate_kv_cache(8, 16), max_batch=4, max_blocks_per_seq=4, capture=False)
    with pytest.raises(GraphsUnsupported, match="parallel.dispatch=auto"):
        DecodeGraphRunner(auto, auto.allocate_kv_cache(8, 16), max_batch=8, max_blocks_per_seq=4, capture=False)
