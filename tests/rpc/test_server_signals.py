"""A signal to the server's whole process group (Ctrl-C in a shell, GNU timeout, systemd's
default KillMode=control-group) drains under parallel=ep2 exactly like a SIGTERM to the front
end alone: the EP rank and the engine-core process ignore it and follow the front end's drain.
In-flight streams finish with every token, new calls get UNAVAILABLE, exit code 0."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from clients import Client, FinishReason, NO_RETRY, errors
from tests.helpers.server_process import ServerProcess
from tests.rpc.test_server_lifecycle import tokens_lasting, wait_health

STREAMS = 4


@pytest.mark.parametrize("sig, engine_process", [(signal.SIGTERM, True), (signal.SIGINT, True),
                                                 (signal.SIGINT, False)],
                         ids=["SIGTERM", "SIGINT", "SIGINT-engine-in-front-end"])
def test_a_signal_to_the_process_group_drains_under_ep2(tmp_path, sig, engine_process):
    with ServerProcess(tmp_path, "parallel=ep2", "server.grace_period_s=60",
                       f"server.engine_process={str(engine_process).lower()}", own_group=True) as srv:
        with Client(srv.target, retry=NO_RETRY, timeout=120) as client:
            n = tokens_lasting(client, 3.0, client.info().max_model_len - 8)
            streams = [client.stream([1, 2, 3 + i], max_new_tokens=n, ignore_eos=True) for i in range(STREAMS)]
            counts = [len(next(s).token_ids) for s in streams]  # every stream is generating
            signalled = time.monotonic()
            srv.signal_group(sig)
            wait_health(client, "NOT_SERVING")
            with pytest.raises(errors.UnavailableError, match="shutting down"):
                client.generate([1, 2], max_new_tokens=2)
            errors_seen: list[BaseException] = []

            def drain(i: int) -> None:
                try:
                    counts[i] += sum(len(c.token_ids) for c in streams[i])
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors_seen.append(exc)

            readers = [threading.Thread(target=drain, args=(i,)) for i in range(STREAMS)]
            for r in readers:
                r.start()
            for r in readers:
                r.join(120)
            assert not errors_seen, errors_seen
            assert counts == [n] * STREAMS
            assert all(s.completion.finish_reason is FinishReason.LENGTH for s in streams)
        assert srv.wait_exit(60) == 0, srv.log()
        log = srv.log()
        assert "SERVING -> DRAINING" in log and "FAILED" not in log and "exited" not in log, log
        assert f"{signal.Signals(sig).name}: draining" in log
        assert time.monotonic() - signalled < 60
