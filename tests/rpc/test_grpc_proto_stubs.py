"""The committed stubs in clients/pb/ must be exactly what proto/generate.py makes from the
.proto files, and the API must keep the names other tools rely on."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "clients" / "pb"


def _generator():
    spec = importlib.util.spec_from_file_location("epserve_proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev dependency) regenerates the stubs")
    fresh = {p.name: p.read_text() for p in _generator().generate(tmp_path / "pb")}
    committed = {p.name: p.read_text() for p in COMMITTED.iterdir() if p.is_file() and p.suffix in (".py", ".pyi")}
    assert sorted(fresh) == sorted(committed), "run: .venv/bin/python proto/generate.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stubs drifted from the .proto ({stale}); run: .venv/bin/python proto/generate.py"


def test_api_names_other_tools_rely_on():
    from clients.pb import generation_pb2 as g
    from clients.pb import service_pb2

    req = g.GenerateRequest.DESCRIPTOR
    assert [f.name for f in req.oneofs_by_name["prompt"].fields] == ["text", "token_ids"]
    assert req.fields_by_name["token_ids"].message_type.fields_by_name["ids"].type == 13  # uint32
    assert req.fields_by_name["max_new_tokens"].type == 13
    sampling = req.fields_by_name["sampling"].message_type.fields_by_name
    assert (sampling["temperature"].type, sampling["top_p"].type, sampling["top_k"].type, sampling["seed"].type) == (2, 2, 5, 4)
    assert sampling["seed"].has_presence and sampling["top_p"].has_presence
    resp = g.GenerateResponse.DESCRIPTOR.fields_by_name
    assert resp["token_ids"].type == 13 and resp["text"].type == 9
    assert resp["finish_reason"].enum_type.name == "FinishReason" and resp["usage"].message_type.name == "Usage"
    service = service_pb2.DESCRIPTOR.services_by_name["GenerationService"]
    assert service.full_name == "epserve.v1.GenerationService"
    assert sorted(m.name for m in service.methods) == sorted(
        ["Abort", "Generate", "GenerateStream", "GetModelInfo", "GetExpertLoad", "GetServerInfo", "GetRoutingPolicy",
         "SetRoutingPolicy"])
    assert service.methods_by_name["GenerateStream"].server_streaming


def test_every_enum_starts_with_unspecified():
    from clients.pb import generation_pb2, info_pb2

    for module in (generation_pb2, info_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            zero = enum.values_by_number[0].name
            assert zero.endswith("_UNSPECIFIED"), f"{enum.name} zero value is {zero}"


def test_client_package_imports_without_the_server():
    """The client library must not pull in torch or the server."""
    code = "import sys, clients; assert 'server' not in sys.modules and 'torch' not in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
