"""SetRoutingPolicyRequest -> the routing.* mapping the engine switches to ({"name": ..., **params}).

Everything a caller sends is judged here, before anything is queued for the engine: a bad
value is INVALID_ARGUMENT naming its field, and nothing changes.
  * google.protobuf.Struct holds every number as a double. An integral value comes back as an
    int, and only integers a double holds exactly (|n| <= 2**53) are accepted: a larger one
    was already rounded on its way here, and one past 64 bits cannot even be packed for the
    engine core (msgpack), which used to leave the switch queued and wedge every later call.
    NaN and the infinities are refused (no policy parameter means them).
  * Sizes are bounded: the name, each key and string, the number of values, the nesting.
  * No file path: a live switch takes no `path` parameter. routing=record and routing=replay
    write or read the file it names with the server's rights, so a caller could overwrite a
    file, fill a disk, or learn whether a file exists. The engine also refuses a live switch
    to any policy that uses files (worker/policy_switch.py); such policies are chosen in the
    server's config at start-up.
What a policy makes of its parameters (ranges that depend on the model, such as
hot_ranks < ep_size) is checked by the engine when it builds the policy, also before the
switch is queued.
"""
from __future__ import annotations

import math
from typing import Any

from google.protobuf import struct_pb2

from clients.pb import routing_pb2 as routing_pb

MAX_EXACT_INTEGER = 2**53  # the largest magnitude below which every integer is a double
MAX_NAME_CHARS = 64
MAX_KEY_CHARS = 64
MAX_STRING_CHARS = 256
MAX_VALUES = 64  # values in params, nested ones included
MAX_DEPTH = 3  # params itself is depth 1
FILE_PARAMS = ("path",)


def routing_mapping(request: routing_pb.SetRoutingPolicyRequest) -> dict[str, Any]:
    """ValueError naming the field when the request cannot be switched to as sent."""
    name = request.name
    if not name:
        raise ValueError("name: give the registered name of a routing policy (e.g. greedy_balanced)")
    if len(name) > MAX_NAME_CHARS or not all(32 < ord(c) < 127 for c in name):
        raise ValueError(f"name: at most {MAX_NAME_CHARS} printable ASCII characters without spaces")
    params = _struct(request.params, "params", [MAX_VALUES], 1) if request.HasField("params") else {}
    if "name" in params:
        raise ValueError("params.name: the policy is named by the request's name field, not a parameter")
    for key in FILE_PARAMS:
        if key in params:
            raise ValueError(f"params.{key}: a live switch takes no file path (the policy would write or read that "
                             f"file with the server's rights); start the server with routing={name} "
                             f"routing.{key}=... to use a file")
    return {"name": name, **params}


def _struct(struct: struct_pb2.Struct, field: str, budget: list[int], depth: int) -> dict[str, Any]:
    if depth > MAX_DEPTH:
        raise ValueError(f"{field}: nested deeper than {MAX_DEPTH} levels")
    out = {}
    for key, value in struct.fields.items():
        if not key or len(key) > MAX_KEY_CHARS:
            raise ValueError(f"{field}: keys must have 1 to {MAX_KEY_CHARS} characters, got {len(key)}")
        out[key] = _value(value, f"{field}.{key}", budget, depth)
    return out


def _value(value: struct_pb2.Value, field: str, budget: list[int], depth: int) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"params: at most {MAX_VALUES} values in all")
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return _number(value.number_value, field)
    if kind == "string_value":
        if len(value.string_value) > MAX_STRING_CHARS:
            raise ValueError(f"{field}: at most {MAX_STRING_CHARS} characters, got {len(value.string_value)}")
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _struct(value.struct_value, field, budget, depth + 1)
    if kind == "list_value":
        if depth + 1 > MAX_DEPTH:
            raise ValueError(f"{field}: nested deeper than {MAX_DEPTH} levels")
        return [_value(v, f"{field}[{i}]", budget, depth + 1) for i, v in enumerate(value.list_value.values)]
    return None  # null_value, or a Value with nothing set


def _number(x: float, field: str) -> int | float:
    if not math.isfinite(x):
        raise ValueError(f"{field}: must be a finite number, got {x}")
    if not x.is_integer():
        return x
    if abs(x) > MAX_EXACT_INTEGER:
        raise ValueError(f"{field}: {x:g} is out of range: integers must lie within [-2**53, 2**53] "
                         "(a protobuf Struct carries numbers as doubles)")
    return int(x)
