"""Deserialize GenerateRequest ourselves so that malformed bytes and a request carrying both
prompt kinds become INVALID_ARGUMENT instead of INTERNAL or a silent choice.

Protobuf keeps only the last member of a oneof seen on the wire, so a request that sets both
`text` and `token_ids` would otherwise be served with whichever came last.
"""
from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from clients.pb import generation_pb2 as gen_pb

_PROMPT_FIELDS = {
    gen_pb.GenerateRequest.DESCRIPTOR.fields_by_name[name].number: name
    for name in ("text", "token_ids")
}


@dataclass(frozen=True)
class ReceivedRequest:
    message: gen_pb.GenerateRequest
    prompt_kinds: tuple[str, ...]  # prompt oneof members present on the wire, in order
    decode_error: str | None = None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def top_level_fields(data: bytes) -> list[int]:
    """Field numbers of the top-level wire records, in order (raises DecodeError)."""
    pos, numbers = 0, []
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        numbers.append(number)
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise DecodeError(f"unsupported wire type {wire_type} for field {number}")
        if pos > len(data):
            raise DecodeError("truncated record")
    return numbers


def parse_generate_request(data: bytes) -> ReceivedRequest:
    message = gen_pb.GenerateRequest()
    try:
        message.ParseFromString(data)
        numbers = top_level_fields(data)
    except DecodeError as exc:
        return ReceivedRequest(gen_pb.GenerateRequest(), (), f"request: not a valid GenerateRequest ({exc})")
    kinds = tuple(dict.fromkeys(_PROMPT_FIELDS[n] for n in numbers if n in _PROMPT_FIELDS))
    return ReceivedRequest(message, kinds)
