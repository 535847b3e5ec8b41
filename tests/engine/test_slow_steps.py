"""A step far slower than the recent median is logged once, with its composition."""
from __future__ import annotations

import logging

import numpy as np

from server.core.slow_steps import REFRESH, SlowStepLog
from server.worker.step_plan import RankBatch, build_step_plan


def plan(query_lens: list[int]):
    q = np.asarray(query_lens, dtype=np.int32)
    n = len(q)
    batch = RankBatch(slots=np.arange(n, dtype=np.int32), query_lens=q, start_pos=np.zeros(n, np.int64),
                      from_device=np.zeros(n, bool), samples=np.ones(n, bool), tokens=np.zeros(int(q.sum()), np.int64))
    return build_step_plan(1, [batch])


def test_one_warning_for_a_stall_with_its_composition(caplog) -> None:
    slow = SlowStepLog(factor=10.0)
    decode = plan([1] * 8)
    with caplog.at_level(logging.WARNING, logger="server.core.slow_steps"):
        for _ in range(2 * REFRESH):
            slow.observe(0.004, decode, decode)
        assert not caplog.records
        slow.observe(0.9, plan([1] * 35 + [40, 60]), decode)
        slow.observe(0.9, decode, decode)  # within the second: counted, not logged
        slow.observe(0.004, decode, decode)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "900.0 ms" in msg and "100 prefill tokens + 35 decode rows (37 sequences)" in msg


def test_no_warning_while_the_median_is_unknown_or_below_the_floor(caplog) -> None:
    slow = SlowStepLog(factor=10.0)
    decode = plan([1])
    with caplog.at_level(logging.WARNING, logger="server.core.slow_steps"):
        slow.observe(5.0, decode, None)  # first step: no median yet
        for _ in range(REFRESH):
            slow.observe(0.0001, decode, decode)
        slow.observe(0.005, decode, decode)  # 50x, but 5 ms: noise on a shared CPU
    assert not caplog.records
