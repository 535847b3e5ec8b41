"""Per-step MoE inputs travel in one MoEStepContext built per forward; the shared MoERuntime
keeps only what lives as long as the model (policy, counters, dispatcher, placement)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from server.config import ModelConfig
from server.model.loader import load_model
from server.moe.routing import build_policy
from server.moe.runtime import MoEStepContext
from tests.helpers.paged_driver import PagedDriver


@pytest.fixture(scope="module")
def model():
    return load_model(ModelConfig(), policy=build_policy("round_robin_balanced"))


def test_step_context_has_one_routing_context_per_moe_layer(model) -> None:
    offset = torch.tensor(7)
    step = model.runtime.step(offset, torch.tensor([True, False]))
    assert len(step.routing) == model.spec.num_moe_layers
    assert [c.layer for c in step.routing] == list(range(model.spec.num_moe_layers))
    assert all(c.token_offset is offset and c.num_experts == model.spec.num_experts and c.top_k == model.spec.top_k
               for c in step.routing)
    assert step.token_offset is offset and step.valid_rows.tolist() == [True, False]
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.valid_rows = None
    assert MoEStepContext(()).token_offset == 0
    assert not hasattr(model.runtime, "valid_rows")  # nothing per-step left on the shared runtime


def test_padding_rows_stay_out_of_the_counters_and_the_runtime(model) -> None:
    driver = PagedDriver(model, num_blocks=8, block_size=16, seed=0)
    batch = driver.build_batch([(0, [5]), (1, [6]), (2, [7])])
    meta = model.attention_backend.build(batch, driver.block_size)
    model.load_counters.reset()
    valid = torch.tensor([True, True, False])
    logits = model.forward_tokens(batch.input_ids, batch.positions, meta, driver.kv, batch.logits_indices, 0, valid)
    assert logits.shape == (3, model.spec.vocab_size)
    assert model.load_counters.snapshot().tokens == [2] * model.spec.num_moe_layers
    model.load_counters.reset()
    model(driver.build_batch([(0, [8]), (1, [9]), (2, [10])]), driver.kv)  # an unpadded step counts every row
    assert model.load_counters.snapshot().tokens == [3] * model.spec.num_moe_layers
