"""routing=record in the real server process: the trace is complete after a SIGTERM shutdown,
at ep_size 1 and at ep_size 2 (spawned EP worker, one file per rank), and its last rows are
exactly the routing that GetExpertLoad counted for the last generation."""
from __future__ import annotations

import pytest
import torch

from clients import Client
from server.moe.routing.trace_file import read_trace
from tests.helpers.server_process import ServerProcess


@pytest.mark.parametrize("ep", [1, 2])
def test_server_writes_a_complete_trace(tmp_path, ep):
    pattern = str(tmp_path / "run.rank{rank}.eptrace")
    overrides = ["routing=record", f"routing.path='{pattern}'", f"parallel=ep{ep}" if ep > 1 else "parallel=single",
                 "routing.flush_tokens=4096"]
    with ServerProcess(tmp_path, *overrides) as srv:
        with Client(srv.target, timeout=120) as client:
            client.expert_load(reset=True)
            prompts = ["def main():\n", "import sys\nfor line in sys.stdin:\n"]
            streams = [client.stream(p, max_new_tokens=6, ignore_eos=True) for p in prompts]  # concurrent
            for s in streams:
                for _ in s:  # drain to the end
                    pass
            load = client.expert_load(reset=True)
            info = client.info()
        assert info.routing.name == "record"
    assert srv.proc.returncode == 0, srv.log()
    traces = [read_trace(tmp_path / f"run.rank{r}.eptrace") for r in range(ep)]
    assert [t.header.ep_rank for t in traces] == list(range(ep))
    assert all(t.header.ep_size == ep and t.num_layers == info.num_moe_layers for t in traces)
    # Tokens routed since the reset: 2 prompts + 2 x 6 generated (the last token is not fed back).
    for layer in range(info.num_moe_layers):
        counted = torch.tensor(load.layers[layer].expert_tokens)
        total = int(counted.sum()) // info.top_k
        if ep == 1:
            tail = traces[0].layers[layer][-total:]
            assert torch.equal(torch.bincount(tail.reshape(-1).long(), minlength=info.num_experts), counted)
        else:  # the generation's rows are split over the ranks' files; together they hold at least them
            assert sum(t.layers[layer].shape[0] for t in traces) >= total
    # Ranks run in lockstep: a rank with no tokens still makes every call (recorded with 0 rows).
    assert len({t.num_steps for t in traces}) == 1 and len({len(t.calls) for t in traces}) == 1


def test_switching_away_from_record_completes_the_trace_and_closes_it(tmp_path):
    """A server started with routing=record, switched live to natural: the trace is complete
    and no process of the server holds it open any more, before the server exits (a policy
    switched away from used to keep its descriptor to the end). Switching back is refused: a
    live switch cannot select a policy that writes files."""
    import os
    from pathlib import Path

    from clients import NO_RETRY, errors
    from tests.rpc.test_server_faults import engine_core_process

    path = tmp_path / "live.eptrace"

    def holders() -> int:
        core = engine_core_process(srv.proc.pid)
        fds = [*Path(f"/proc/{core}/fd").iterdir(), *Path(f"/proc/{srv.proc.pid}/fd").iterdir()]
        return sum(1 for fd in fds if os.path.realpath(fd) == str(path))

    with ServerProcess(tmp_path, "routing=record", f"routing.path={path}", "routing.flush_tokens=4096",
                       "server.allow_routing_switch=true") as srv:
        with Client(srv.target, timeout=60, retry=NO_RETRY) as client:
            client.generate([5, 6, 7, 8], max_new_tokens=3, ignore_eos=True)
            assert holders() == 1
            assert client.set_routing_policy("natural").name == "natural"
            assert holders() == 0
            trace = read_trace(path)  # complete: every block flushed, no truncated tail
            assert trace.num_layers == client.info().num_moe_layers and trace.layers[0].shape[0] >= 4 + 2
            with pytest.raises(errors.InvalidRequestError, match="live switch"):
                client.set_routing_policy("record")
            assert client.generate([1, 2], max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
    assert srv.proc.returncode == 0, srv.log()
