"""Deserialize GenerateRequest ourselves so that malformed bytes and a request carrying both
prompt kinds become INVALID_ARGUMENT instead of INTERNAL or a silent choice.

Protobuf keeps only the last member of a oneof seen on the wire, so a request that sets both
`text` and `token_ids` would otherwise be served with whichever came last. To see both, the
same bytes are parsed a second time as `_PromptPresence`, a message with the two prompt fields
as plain `bytes` fields (no oneof, nested message not parsed). Both parses run in protobuf's C
parser: no Python loop over wire records, so the cost of a request is bounded by the message
size limit (server.max_message_bytes) at C speed, whatever it holds (millions of tiny unknown
fields included).
"""
from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from clients.pb import generation_pb2 as gen_pb

_PROMPT_FIELDS = ("text", "token_ids")


def _presence_class():
    """A message type sharing the prompt fields' numbers, each a plain optional bytes field."""
    fields = gen_pb.GenerateRequest.DESCRIPTOR.fields_by_name
    proto = descriptor_pb2.FileDescriptorProto(name="epserve_prompt_presence.proto", package="epserve.internal",
                                               syntax="proto3")
    msg = proto.message_type.add(name="PromptPresence")
    for i, name in enumerate(_PROMPT_FIELDS):
        msg.field.add(name=name, number=fields[name].number, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, proto3_optional=True, oneof_index=i)
        msg.oneof_decl.add(name=f"_{name}")  # proto3 `optional`: a synthetic oneof gives presence
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("epserve.internal.PromptPresence"))


_PromptPresence = _presence_class()


@dataclass(frozen=True)
class ReceivedRequest:
    message: gen_pb.GenerateRequest
    prompt_kinds: tuple[str, ...]  # prompt oneof members present on the wire
    decode_error: str | None = None


def parse_generate_request(data: bytes) -> ReceivedRequest:
    message = gen_pb.GenerateRequest()
    presence = _PromptPresence()
    try:
        message.ParseFromString(data)
        presence.ParseFromString(data)
    except DecodeError as exc:
        return ReceivedRequest(gen_pb.GenerateRequest(), (), f"request: not a valid GenerateRequest ({exc})")
    kinds = tuple(name for name in _PROMPT_FIELDS if presence.HasField(name))
    return ReceivedRequest(message, kinds)
