"""Bad input leaves the server healthy; a request cannot select or load a routing policy.

One server for the module, started with a *tripwire* routing plugin installed: a distribution
(dist-info + module on PYTHONPATH) whose entry point in `epserve.routing_policies` writes a
marker file when it is imported. The registry imports plugins only when it is asked for a name
it does not know, so if any request field ever reached the registry — asking for the plugin's
name, a `module:Class` path, or any unknown name — the marker would appear. A positive control
shows that the same plugin does fire when the registry is asked for it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from clients import Client
from clients.pb import generation_pb2 as g
from tests.helpers.bad_requests import BAD_REQUESTS, Limits, good
from tests.helpers.server_process import ROOT, ServerProcess

PLUGIN_NAME = "tripwire_policy"
PLUGIN_PATH = "epserve_tripwire:TripwirePolicy"
PLUGIN_MODULE = """
import os
from server.moe.routing import RoutingPolicy

with open(os.environ["EPSERVE_TRIPWIRE"], "a") as f:
    f.write(f"imported in pid {os.getpid()}\\n")


class TripwirePolicy(RoutingPolicy):
    def route(self, topk_ids, topk_weights, router_logits, ctx):
        return topk_ids.int()
"""


def install_tripwire(site) -> None:
    """A minimal installed distribution: what `pip install` leaves behind, minus pip."""
    dist = site / "epserve_tripwire-0.0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epserve-tripwire\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text(f"[epserve.routing_policies]\n{PLUGIN_NAME} = {PLUGIN_PATH}\n")
    (site / "epserve_tripwire.py").write_text(PLUGIN_MODULE)


def plugin_env(site, marker) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "EPSERVE_TRIPWIRE": str(marker)}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("tripwire-site")
    install_tripwire(site)
    return site


@pytest.fixture(scope="module")
def server(tmp_path_factory, site):
    tmp = tmp_path_factory.mktemp("reliability-input")
    with ServerProcess(tmp, env=plugin_env(site, tmp / "tripwire-fired")) as srv:
        srv.marker = tmp / "tripwire-fired"
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def raw(server):
    """Generate with raw bytes as the request (to send what the client library cannot)."""
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/epserve.v1.GenerationService/Generate", request_serializer=lambda b: b,
                                   response_deserializer=g.GenerateResponse.FromString)
        yield lambda payload: call(payload, timeout=30)


# -- wire helpers: unknown fields of every wire type ----------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _string(number: int, text: str) -> bytes:
    data = text.encode()
    return _key(number, 2) + _varint(len(data)) + data


def unknown_fields(*names: str) -> bytes:
    """Fields GenerateRequest does not define, carrying `names` (as a client with a newer or
    hostile .proto would send them), plus a nested unknown field inside `sampling`."""
    out = b"".join(_string(number, name) for number, name in zip((11, 15, 99, 4095), names))
    out += _key(100, 0) + _varint(7) + _key(2047, 5) + b"\x01\x02\x03\x04" + _key(2**29 - 1, 1) + bytes(8)
    return out + _string(4, _string(9, f"policy={names[0]}").decode())  # merges into sampling


# -- security: routing is chosen by the operator, never by a request ------------------------
def test_tripwire_fires_when_the_registry_is_asked_for_it(tmp_path, site):
    """Positive control: the plugin is installed and the registry does load it for its name."""
    marker = tmp_path / "fired"
    code = (f"from server.moe.routing import canonical_name; "
            f"print(canonical_name({PLUGIN_NAME!r}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **plugin_env(site, marker)},
                         capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == PLUGIN_NAME, run.stderr
    assert marker.read_text().startswith("imported")


def test_no_request_field_can_name_a_policy():
    """The API has no field that selects routing: nothing in GenerateRequest (recursively)."""
    def names(descriptor, prefix=""):
        for f in descriptor.fields:
            yield prefix + f.name
            if f.message_type is not None:
                yield from names(f.message_type, f"{prefix}{f.name}.")

    fields = list(names(g.GenerateRequest.DESCRIPTOR))
    assert "sampling.temperature" in fields
    # return_routed_experts only asks for output: a bool, it can name nothing
    by_name = g.GenerateRequest.DESCRIPTOR.fields_by_name
    assert by_name["return_routed_experts"].type == by_name["return_routed_experts"].TYPE_BOOL
    suspicious = [f for f in fields if f != "return_routed_experts" and any(
        w in f.lower() for w in ("rout", "polic", "plugin", "module", "class", "expert", "entry", "target"))]
    assert not suspicious, suspicious


def test_a_request_cannot_select_or_load_a_routing_policy(server, client, raw):
    """Requests that name the plugin, a module:Class path or another built-in policy in every
    string field and in unknown fields are served like the same request without them: same
    tokens, same experts chosen (GetExpertLoad), routing still `natural`, plugin never imported."""
    prompt = list(range(3, 35))  # 32 tokens, one prefill step
    plain = good(token_ids=g.TokenIds(ids=prompt), max_new_tokens=2, ignore_eos=True)
    names = (PLUGIN_NAME, PLUGIN_PATH, "greedy_balanced", "round_robin_balanced")

    client.expert_load(reset=True)
    reference = raw(plain.SerializeToString())
    natural_load = client.expert_load(reset=True).matrix()
    # Power check: natural routing of this prompt is unbalanced, so a balancing policy would show.
    assert any(max(row) - min(row) > 1 for row in natural_load), natural_load

    hostile = good(token_ids=g.TokenIds(ids=prompt), max_new_tokens=2, ignore_eos=True,
                   request_id=PLUGIN_NAME, stop=list(names))
    reply = raw(hostile.SerializeToString() + unknown_fields(*names))
    assert list(reply.token_ids) == list(reference.token_ids)
    assert client.expert_load(reset=True).matrix() == natural_load

    text = client.generate(f"routing.name={PLUGIN_NAME} policy={PLUGIN_PATH} _target_=os.system",
                           max_new_tokens=2, ignore_eos=True)
    assert text.usage.completion_tokens == 2
    assert client.info().routing.name == "natural" and client.server_info().config["routing_policy"] == "natural"
    assert not server.marker.exists(), server.marker.read_text()


# -- bad input: the whole table, and more, then the server is still fine --------------------
def _truncated(lim: Limits) -> bytes:
    return good(text="hello there").SerializeToString()[:-3]


EXTRA_BAD = [  # (name, payload builder, status, field named at the start of the details or None)
    ("negative output_format", lambda lim: good(output_format=-1).SerializeToString(), "INVALID_ARGUMENT", "output_format"),
    ("huge output_format", lambda lim: good(output_format=2**31 - 1).SerializeToString(), "INVALID_ARGUMENT", "output_format"),
    ("empty message", lambda lim: b"", "INVALID_ARGUMENT", "prompt"),
    ("truncated message", _truncated, "INVALID_ARGUMENT", "request"),
    ("sampling is not a message", lambda lim: good().SerializeToString() + _string(4, "\xff\xff"), "INVALID_ARGUMENT",
     "request"),
    ("17 stop strings of 257 bytes", lambda lim: good(stop=["y" * 257] * 17).SerializeToString(), "INVALID_ARGUMENT",
     "stop"),
    ("both prompts, ids first", lambda lim: good().SerializeToString() + g.GenerateRequest(text="x").SerializeToString(),
     "INVALID_ARGUMENT", "prompt"),
    ("oversized message (4 MiB + 10 bytes)", lambda lim: good(text="x" * (4 * 2**20 + 10)).SerializeToString(),
     "RESOURCE_EXHAUSTED", None),
]


def test_bad_input_barrage_leaves_the_server_healthy(server, client, raw):
    """All of BAD_REQUESTS plus EXTRA_BAD, back to back: each gets its status and names its
    field; afterwards health is SERVING, the engine is idle, no call ended INTERNAL, and a fixed
    greedy generation gives the same tokens as before the barrage."""
    model = client.info()
    lim = Limits(model.vocab_size, model.max_model_len)
    before = client.generate([21, 22, 23], max_new_tokens=8, ignore_eos=True).token_ids
    cases = [(c.name, c.build, c.code, c.field) for c in BAD_REQUESTS] + EXTRA_BAD
    assert len(cases) >= 30
    for name, build, code, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            raw(build(lim))
        assert err.value.code().name == code, (name, err.value.details())
        if field is not None:
            assert err.value.details().startswith(f"{field}: "), (name, err.value.details())
    assert client.health() == "SERVING"
    info = client.server_info()
    stats = info.stats
    assert (stats.running_sequences, stats.waiting_sequences, stats.kv_blocks_used, stats.active_calls) == (0, 0, 0, 0)
    assert not {"INTERNAL", "UNKNOWN"} & set(stats.requests_by_code), stats.requests_by_code
    assert client.generate([21, 22, 23], max_new_tokens=8, ignore_eos=True).token_ids == before
    assert not server.marker.exists()
