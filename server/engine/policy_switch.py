"""Switch a running rank's routing policy in place, between steps (a plan's `routing` field).

Rank 0 puts the same routing.* mapping in every rank's plan for one step, so all ranks switch
at once and no step ever mixes two policies. Each rank builds the policy the mapping names
(checked against the model's shape as at start-up) and points its MoE layers at it: they all
follow one policy object (MoERuntime). Policies are kept by their canonical form (name and
parameters), so switching back and forth A B A B reuses the same objects — and their
captured decode graphs: a graph bakes in the kernels of the policy it was captured with, so
each policy gets its own captured set on first use, and up to `keep_graphs` sets stay.

A switch never imports anything: it may name only policies registered when it is asked for
(built-ins, and entry-point plugins discovered at start-up: with server.allow_routing_switch
every rank discovers them when it builds its model, rank_worker.build_runner); any other name
is unknown, and the error lists the registered ones.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any, Callable, Mapping

from ..config import ConfigError, RoutingConfig
from ..moe.routing.registry import POLICIES
from ..routing_setup import build_routing_policy

log = logging.getLogger(__name__)

KEEP_GRAPH_SETS = 4  # captured decode-graph sets kept per rank (one per recently used policy)


def routing_key(routing: Mapping[str, Any]) -> str:
    """The plan mapping as a dictionary key (config order and aliases left as given)."""
    return json.dumps(dict(routing), sort_keys=True, default=str)


class PolicySwitch:
    """A rank's routing policies and the decode graphs captured with each.

    `capture(record=False)` captures decode graphs for the model's current policy (None: decode
    stays eager, e.g. a host-side policy or a CPU model), with `record` ones that also write
    routed experts; `graphs` are the ones captured at start-up.
    """

    def __init__(self, model, capture: Callable[[], Any] | None, graphs: Any = None,
                 keep_graphs: int = KEEP_GRAPH_SETS) -> None:
        self.model = model
        self._capture = capture
        self._keep = max(1, keep_graphs)
        self._policies: dict[str, Any] = {}  # plan mapping -> policy
        self._canonical: dict[str, Any] = {repr(model.policy): model.policy}  # repr -> policy
        self._graphs: OrderedDict[str, Any] = OrderedDict()  # repr -> graph set (or None), recent last
        if capture is not None:
            self._graphs[repr(model.policy)] = graphs

    def policy_for(self, routing: Mapping[str, Any]):
        """The policy `routing` names, built once (ConfigError if it cannot serve this model)."""
        key = routing_key(routing)
        policy = self._policies.get(key)
        if policy is None:
            name = routing.get("name", "natural")
            if name not in POLICIES:  # checked without discovery: a switch imports nothing
                known = ", ".join(POLICIES.names(discover=False))
                raise ConfigError(f"routing.name: unknown routing policy {name!r}; known routing policies: {known}")
            spec = self.model.spec
            built = build_routing_policy(RoutingConfig.from_dict(routing), num_experts=spec.num_experts,
                                         top_k=spec.top_k, ep_size=self.model.ep_size, num_layers=spec.num_moe_layers)
            policy = self._canonical.setdefault(repr(built), built)
            self._policies[key] = policy
        return policy

    def switch(self, routing: Mapping[str, Any]) -> Any:
        """Make the policy `routing` names the model's; -> the decode graphs to use with it."""
        policy = self.policy_for(routing)
        name = repr(policy)
        if policy is not self.model.policy:
            self.model.policy = policy
            log.info("routing policy switched to %s", name)
        if self._capture is None:
            return None
        if name not in self._graphs:
            self._graphs[name] = self._capture()  # graphs read model.policy: captured with the new one
            while len(self._graphs) > self._keep:
                dropped, _ = self._graphs.popitem(last=False)
                log.info("dropped the decode graphs captured with %s", dropped)
        self._graphs.move_to_end(name)
        return self._graphs[name]

    def recording_graphs(self) -> Any:
        """Decode graphs of the current policy that also record routed experts
        (engine/routed_experts.py), captured the first time a step asks for them."""
        if self._capture is None:
            return None
        name = repr(self.model.policy) + " +routed experts"
        if name not in self._graphs:
            self._graphs[name] = self._capture(record=True)
            while len(self._graphs) > self._keep:
                dropped, _ = self._graphs.popitem(last=False)
                log.info("dropped the decode graphs captured with %s", dropped)
        self._graphs.move_to_end(name)
        return self._graphs[name]
