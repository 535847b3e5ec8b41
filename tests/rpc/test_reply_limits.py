"""Replies against server.max_message_bytes, on a live server with a 16 KiB limit: a stream
whose routed-expert rows do not fit one message gets them split over several, each within
the limit, the same rows in the same order; a unary reply that cannot fit is refused with
RESOURCE_EXHAUSTED, counted as that, with nothing in the log (before: the stream failed with
RESOURCE_EXHAUSTED on the client while the server counted it CANCELLED, and each such call
logged an ERROR traceback)."""
from __future__ import annotations

import grpc
import pytest

from clients import Client, NO_RETRY, errors
from clients.convert import build_request, routed_experts_from_pb
from clients.pb.service_pb2_grpc import GenerationServiceStub
from tests.helpers.server_process import ServerProcess

LIMIT = 16384


def test_routed_experts_are_split_to_fit_and_an_oversized_unary_reply_is_resource_exhausted(tmp_path):
    with ServerProcess(tmp_path, f"server.max_message_bytes={LIMIT}") as srv:
        with Client(srv.target, timeout=120, retry=NO_RETRY) as c:
            model = c.info()
            row_bytes = model.num_moe_layers * model.top_k * 2
            prompt = [5 + (i * 7) % 200 for i in range(1500)]
            new = 6
            assert len(prompt) * row_bytes > LIMIT * 1.4  # the prompt rows alone need two messages or more
            plain = c.generate(prompt, max_new_tokens=new, ignore_eos=True, return_routed_experts=True)
            before = c.server_info().stats.requests_by_code
            log_lines = srv.log().count("\n")

            with grpc.insecure_channel(srv.target) as channel:
                request = build_request(prompt, max_new_tokens=new, ignore_eos=True, return_routed_experts=True,
                                        include_prompt=True)
                messages = list(GenerationServiceStub(channel).GenerateStream(request, timeout=120))
            assert all(m.ByteSize() <= LIMIT for m in messages), [m.ByteSize() for m in messages]
            assert len(messages) >= 3 and not messages[0].token_ids  # rows first, in messages of their own
            rows = [r for m in messages if m.HasField("routed_experts") for r in routed_experts_from_pb(m.routed_experts)]
            assert len(rows) == len(prompt) + new - 1
            assert rows[len(prompt) - 1:] == plain.routed_experts  # the same positions, the same rows
            assert [t for m in messages for t in m.token_ids] == list(plain.token_ids)

            with pytest.raises(errors.ResourceExhaustedError) as exc:
                c.generate(prompt, max_new_tokens=new, ignore_eos=True, return_routed_experts=True,
                           include_prompt=True)
            assert "server.max_message_bytes" in exc.value.details and "GenerateStream" in exc.value.details
            after = c.server_info().stats.requests_by_code
            assert c.health() == "SERVING"
    grown = {code: n - before.get(code, 0) for code, n in after.items() if n != before.get(code, 0)}
    assert grown == {"OK": 1, "RESOURCE_EXHAUSTED": 1}, grown  # as the client saw them
    new_lines = srv.log().splitlines()[log_lines:]
    assert not [line for line in new_lines if "Traceback" in line or " ERROR " in line], "\n".join(new_lines)
