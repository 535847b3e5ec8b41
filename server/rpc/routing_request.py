"""SetRoutingPolicyRequest -> the routing.* mapping the engine switches to ({"name": ..., **params}).

google.protobuf.Struct holds every number as a double, so integral values come back as ints
(seeds, counts; a policy that wants a float accepts an int too). What the policy itself makes
of the parameters is checked by the engine, against the registry, when it builds the policy.
"""
from __future__ import annotations

from typing import Any

from clients.convert import struct_to_dict
from clients.pb import routing_pb2 as routing_pb


def routing_mapping(request: routing_pb.SetRoutingPolicyRequest) -> dict[str, Any]:
    """ValueError naming the field when the request cannot name a policy at all."""
    if not request.name:
        raise ValueError("name: give the registered name of a routing policy (e.g. greedy_balanced)")
    params = struct_to_dict(request.params) if request.HasField("params") else {}
    if "name" in params:
        raise ValueError("params.name: the policy is named by the request's name field, not a parameter")
    return {"name": request.name, **params}
