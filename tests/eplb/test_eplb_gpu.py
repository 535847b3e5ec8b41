"""EPLB on the GPU machine (pytest -m gpu tests/eplb/test_eplb_gpu.py): the replica map inside a
captured CUDA graph follows a rebalance without re-capture, the tiny model with EPLB matches
the block layout on CUDA before and after a rebalance, and the ep 2 model test over NCCL
(expert weights moving between GPUs)."""
from __future__ import annotations

import pytest
import torch

from server.config import ModelConfig, ParallelConfig
from server.model.loader import load_model
from server.moe.eplb.placement import ExpertPlacement
from server.moe.eplb.replica_map import ReplicaMap
from server.moe.eplb.settings import resolve_eplb
from server.moe.routing import build_policy
from tests.helpers.paged_driver import PagedDriver
from tests.eplb.test_eplb_model import reversed_placement

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_replica_map_in_a_cuda_graph_follows_updates() -> None:
    a = ExpertPlacement(4, 2, ((0, 1, 2, 3, 1, 1),))
    b = ExpertPlacement(4, 2, ((3, 3, 3, 2, 1, 0),))
    rmap = ReplicaMap(a, device="cuda")
    ids = torch.tensor([[1, 3]] * 6, dtype=torch.int32, device="cuda")
    offset = torch.zeros((), dtype=torch.int64, device="cuda")
    rmap(0, ids, offset)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rmap(0, ids, offset)
    graph.replay()
    assert torch.equal(out, rmap(0, ids, offset))
    rmap.update(b)
    offset.fill_(1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, rmap(0, ids, offset)) and out[:, 1].tolist() == [1, 2, 0, 1, 2, 0]


def test_tiny_model_with_eplb_on_cuda_matches_block_layout() -> None:
    prompts = [(0, list(b"The quick brown fox")), (1, list(b"jumps over")), (2, list(range(40, 100)))]
    base = load_model(ModelConfig(), policy=build_policy("natural"), device="cuda")
    eplb = resolve_eplb(ParallelConfig(redundant_experts=8), num_layers=4, num_experts=16, ep_size=1)
    placed = load_model(ModelConfig(), policy=build_policy("natural"), device="cuda", eplb=eplb)

    def logits(model):
        return torch.stack(list(PagedDriver(model, num_blocks=64, block_size=16).step(prompts).values()))

    want = logits(base)
    assert (logits(placed) - want).abs().max() < 1e-3
    # At ep 1 a rebalance has no rank imbalance to remove and changes nothing: force a placement
    # (every layer's slots reversed) so weights really move under the model, then compare.
    changed, _, local = placed.eplb.apply(reversed_placement(placed.placement))
    assert changed == 4 and local > 0
    assert (logits(placed) - want).abs().max() < 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_eplb_model_over_nccl_ep2(tmp_path) -> None:
    from tests.helpers.hf_models import build_hf_model, save_hf_model
    from tests.eplb.test_eplb_model import check_eplb_ranks

    folder = save_hf_model(build_hf_model("qwen3_moe", seed=5), tmp_path / "qwen3")
    check_eplb_ranks(folder, tmp_path, 2, device="cuda", atol=1e-3)


def test_weights_moved_under_captured_decode_graphs_keep_greedy_outputs(tmp_path) -> None:
    """At ep 1 the decode CUDA graphs are captured once over the expert weight tensors; a forced
    placement (every copy to another slot) moves the weights in place and rewrites the replica
    map, so the same graphs replay the new layout: greedy outputs stay the same."""
    from server.config import AppConfig
    from server.frontend.start import start_engine
    from tests.engine.test_engine_generate import PROMPTS, build_model_folder, request, serve_all
    from tests.eplb.test_eplb_model import reversed_placement

    build_model_folder(tmp_path, seed=3)
    app = AppConfig.from_dict({
        "model": {"name": "tiny-test", "path": str(tmp_path), "max_model_len": 64},
        "parallel": {"ep_size": 1, "redundant_experts": 4},
        "engine": {"kv_cache_tokens": 512, "kv_block_size": 4, "max_num_batched_tokens": 8, "max_num_seqs": 3,
                   "max_queue": 64, "gpu_memory_utilization": 0},
    })
    eng = start_engine(app, in_thread=True)
    try:
        runner = eng.core.executor.runner
        assert runner.decode_graphs is not None, "decode must run as CUDA graphs for this test to mean anything"
        before = [r[0] for r in serve_all(eng, [request(i, p) for i, p in enumerate(PROMPTS)])]
        old = runner.model.placement
        changed, moved, local = runner.model.eplb.apply(reversed_placement(old))
        assert changed == len(old.slots) and moved == 0 and local > 0
        after = [r[0] for r in serve_all(eng, [request(10 + i, p) for i, p in enumerate(PROMPTS)])]
        assert after == before
    finally:
        eng.shutdown()
