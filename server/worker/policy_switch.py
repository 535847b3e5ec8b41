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
every rank discovers them when it builds its model, worker/rank.py build_runner); any other name
is unknown, and the error lists the registered ones.

What a rank keeps is bounded whatever callers ask for: at most `keep_policies` built policies
(the current one always among them, the least recently used dropped first, with their
graphs), and a policy that uses files (routing=record) is released the moment the rank
switches away from it: its trace is completed and its descriptor closed, and it is forgotten,
so asking for it again builds a new one. A switch from the API may not name such a policy at
all (`refuse_file_policies`): it would hand callers the server's file access.
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
RECORDING = " +routed experts"  # graph-set name suffix: graphs that also write routed experts
KEEP_POLICIES = 16  # built policies kept per rank for switching back (the current one always)


def refuse_file_policies(routing: Mapping[str, Any]) -> None:
    """ConfigError if `routing` names a policy that writes or reads files: the server's own
    config may choose one, a live switch (SetRoutingPolicy) may not."""
    name = routing.get("name", "natural")
    if isinstance(name, str) and name in POLICIES and POLICIES.get(name).uses_files:
        raise ConfigError(f"routing.name: {name} writes or reads the file routing.path names, so a live switch "
                          f"cannot select it (that would give callers the server's file access); start the "
                          f"server with routing={name} instead")


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
                 keep_graphs: int = KEEP_GRAPH_SETS, keep_policies: int = KEEP_POLICIES) -> None:
        self.model = model
        self._capture = capture
        self._keep = max(1, keep_graphs)
        self._keep_policies = max(1, keep_policies)
        self._policies: dict[str, Any] = {}  # plan mapping -> policy
        self._canonical: OrderedDict[str, Any] = OrderedDict({repr(model.policy): model.policy})  # repr -> policy, recent last
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
            if policy is not built:
                built.release()
            self._policies[key] = policy
        self._canonical.move_to_end(repr(policy))
        while len(self._canonical) > self._keep_policies:
            self._forget(next(kept for kept in self._canonical.values() if kept is not self.model.policy))
        return policy

    @property
    def kept_policies(self) -> int:
        """How many built policies this rank holds now."""
        return len(self._canonical)

    def _forget(self, policy) -> None:
        """Release `policy` and drop it, the mappings that led to it and its graphs."""
        name = repr(policy)
        for kept_name in [n for n, kept in self._canonical.items() if kept is policy]:
            del self._canonical[kept_name]
        for key in [k for k, kept in self._policies.items() if kept is policy]:
            del self._policies[key]
        self._graphs.pop(name, None)
        self._graphs.pop(name + RECORDING, None)
        policy.release()
        log.info("released routing policy %s", name)

    def switch(self, routing: Mapping[str, Any]) -> Any:
        """Make the policy `routing` names the model's; -> the decode graphs to use with it."""
        policy = self.policy_for(routing)
        name = repr(policy)
        previous = self.model.policy
        if policy is not previous:
            self.model.policy = policy
            log.info("routing policy switched to %s", name)
            if previous.uses_files:  # its trace is complete now, and its descriptor closed
                self._forget(previous)
        if self._capture is None:
            return None
        if name not in self._graphs:
            self._graphs[name] = self._capture()  # graphs read model.policy: captured with the new one
            while len(self._graphs) > self._keep:
                dropped, _ = self._graphs.popitem(last=False)
                log.info("dropped the decode graphs captured with %s", dropped)
        self._graphs.move_to_end(name)
        return self._graphs[name]

    def recapture(self) -> Any:
        """Drop every captured set and capture the current policy's anew -> its decode graphs.
        For a model whose graphed code changed (a dispatcher swapped in), not for new weights
        written in place (graphs read those as they are)."""
        self._graphs.clear()
        if self._capture is None:
            return None
        name = repr(self.model.policy)
        self._graphs[name] = self._capture()
        return self._graphs[name]

    def recording_graphs(self) -> Any:
        """Decode graphs of the current policy that also record routed experts
        (worker/routed_experts.py), captured the first time a step asks for them."""
        if self._capture is None:
            return None
        name = repr(self.model.policy) + RECORDING
        if name not in self._graphs:
            self._graphs[name] = self._capture(record=True)
            while len(self._graphs) > self._keep:
                dropped, _ = self._graphs.popitem(last=False)
                log.info("dropped the decode graphs captured with %s", dropped)
        self._graphs.move_to_end(name)
        return self._graphs[name]
