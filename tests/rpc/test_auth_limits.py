"""Auth against probing and guessing, on a live server with a token: an unknown method is
answered UNAUTHENTICATED without the token, exactly as a known one, and UNIMPLEMENTED only
with it (method names used to be probeable without a token); failed token attempts are
budgeted per client address, and once the budget is spent even the right token is not
judged (before: about 900 guesses a second were answered)."""
from __future__ import annotations

import time

import grpc
import pytest

from server.rpc.auth_limiter import BURST, PER_S
from tests.helpers.server_process import ServerProcess

TOKEN = "limit-test-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("auth"), f"server.auth_token={TOKEN}", wait_ready=False) as srv:
        srv.wait_ready(token=TOKEN)
        yield srv


def call(channel: grpc.Channel, method: str, token: str | None, streaming: bool = False) -> tuple[grpc.StatusCode, str]:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    try:
        if streaming:
            list(channel.unary_stream(method)(b"", metadata=metadata, timeout=10))
        else:
            channel.unary_unary(method)(b"", metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_unknown_methods_meet_the_token_check_first(server):
    unknown = ("/epserve.v1.GenerationService/NoSuchMethod", "/no.such.Service/Call",
               "/grpc.reflection.v1alpha.ServerReflection/Nope")
    with grpc.insecure_channel(server.target) as channel:
        known_without_token = call(channel, "/epserve.v1.GenerationService/GetServerInfo", None)
        assert known_without_token[0] == grpc.StatusCode.UNAUTHENTICATED
        for method in unknown:
            for streaming in (False, True):
                assert call(channel, method, None, streaming) == known_without_token, method  # nothing to tell apart
                assert call(channel, method, "wrong", streaming)[0] == grpc.StatusCode.UNAUTHENTICATED
                assert call(channel, method, TOKEN, streaming)[0] == grpc.StatusCode.UNIMPLEMENTED, method
        assert call(channel, "/grpc.health.v1.Health/Nope", None)[0] == grpc.StatusCode.UNIMPLEMENTED  # health is public

        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(stub.ServerReflectionInfo(iter([request]), metadata=(("authorization", f"Bearer {TOKEN}"),),
                                                 timeout=10))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "epserve.v1.GenerationService" in names
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_failed_token_attempts_are_budgeted_per_address(server):
    time.sleep(BURST / PER_S)  # the budget refilled after the test before
    method = "/epserve.v1.GenerationService/GetServerInfo"
    with grpc.insecure_channel(server.target) as channel:
        start = time.monotonic()
        answers = [call(channel, method, f"guess-{i}") for i in range(4 * BURST)]
        elapsed = time.monotonic() - start
        right_while_spent = call(channel, method, TOKEN)
        judged = sum(details == "invalid bearer token" for _, details in answers)
        unchecked = sum("was not checked" in details for _, details in answers)
        assert all(code == grpc.StatusCode.UNAUTHENTICATED for code, _ in answers)
        assert judged + unchecked == len(answers) and judged <= BURST + PER_S * elapsed + 1, (judged, elapsed)
        # a right guess looks like a wrong one while the budget is spent
        assert right_while_spent[0] == grpc.StatusCode.UNAUTHENTICATED and "was not checked" in right_while_spent[1]
        end = time.monotonic() + 2.0  # one failure's worth of budget comes back within 1 / PER_S
        while call(channel, method, TOKEN)[0] != grpc.StatusCode.OK:
            assert time.monotonic() < end, "the right token is still refused"
            time.sleep(0.05)
    print(f"{len(answers)} guesses in {elapsed:.2f}s: {judged} judged, {unchecked} refused unchecked")
