"""EP dispatch/combine: send each (token, expert) pair to the rank owning the expert, bring the
weighted results back. Chosen once when the model is built (`parallel.dispatch`):

  local       ep_size 1: nothing travels                                  local.py
  allgather   fixed capacity, no host sync, graph-safe: all-gather the    all_gather.py
              tokens (ids and weights in the same rows), local experts on
              all of them, partial sums back in one equal-split all-to-all
  alltoall    variable splits: only existing pairs travel; a host sync    all_to_all.py
              per layer, eager only
  auto        local at ep_size 1; else allgather up to the prefill chunk, size_routed.py
              alltoall beyond

token_rows.py packs a token's hidden row, ids and weights into one byte row; fp8_rows.py packs
the hidden row as e4m3 codes and group scales instead (allgather's `parallel.dispatch_wire=fp8`);
wire.py picks the row per wire and counts its bytes per token. base.py says what every
dispatcher offers (Dispatcher, DispatchSettings). `register_dispatcher` adds one to
DISPATCHERS (a server/registry.Registry: an unknown name is a DispatchConfigError listing the
names that exist).
"""
from __future__ import annotations

from typing import Callable

import torch.distributed as dist

from ...registry import Registry
from ..experts import combine  # noqa: F401 (public here too)
from .all_gather import GatherDispatcher
from .all_to_all import AllToAllDispatcher
from .base import Dispatcher, DispatchSettings
from .local import LocalDispatcher
from .size_routed import SizeRoutedDispatcher
from .wire import WIRES, wire_row_bytes

Builder = Callable[[DispatchSettings, int, int, int, "dist.ProcessGroup | None"], Dispatcher]


class DispatchConfigError(ValueError):
    """A dispatcher name or setting that cannot work for this model and EP size."""


def _unknown(name: str, known: list[str]) -> DispatchConfigError:
    return DispatchConfigError(f"unknown parallel.dispatch {name!r}; available: {', '.join(known)}")


#: parallel.dispatch name -> builder(settings, ep_rank, ep_size, num_experts, group) -> Dispatcher
DISPATCHERS: Registry[Builder] = Registry("dispatcher", error=_unknown)


def register_dispatcher(name: str) -> Callable[[Builder], Builder]:
    return DISPATCHERS.register(name)


def _needs_group(name: str, ep_size: int, group) -> None:
    if ep_size == 1 and group is None and not dist.is_initialized():
        raise DispatchConfigError(f"parallel.dispatch={name} at ep_size 1 runs over a size-1 process group, "
                                  "but none was given and torch.distributed is not initialised")


@register_dispatcher("local")
def _local(settings: DispatchSettings, ep_rank: int, ep_size: int, num_experts: int, group) -> Dispatcher:
    if ep_size != 1:
        raise DispatchConfigError(f"parallel.dispatch=local needs ep_size 1, got {ep_size}")
    return LocalDispatcher()


@register_dispatcher("allgather")
def _allgather(settings: DispatchSettings, ep_rank: int, ep_size: int, num_experts: int, group) -> Dispatcher:
    _needs_group("allgather", ep_size, group)
    return GatherDispatcher(ep_rank, ep_size, num_experts, group, wire=settings.wire)


@register_dispatcher("alltoall")
def _alltoall(settings: DispatchSettings, ep_rank: int, ep_size: int, num_experts: int, group) -> Dispatcher:
    _needs_group("alltoall", ep_size, group)
    return AllToAllDispatcher(ep_rank, ep_size, num_experts, group)


@register_dispatcher("auto")
def _auto(settings: DispatchSettings, ep_rank: int, ep_size: int, num_experts: int, group) -> Dispatcher:
    if ep_size == 1:
        return LocalDispatcher()
    return SizeRoutedDispatcher(GatherDispatcher(ep_rank, ep_size, num_experts, group, wire=settings.wire),
                                AllToAllDispatcher(ep_rank, ep_size, num_experts, group), settings.fixed_max_rows)


def build_dispatcher(settings: DispatchSettings | None, ep_rank: int, ep_size: int, num_experts: int,
                     group: dist.ProcessGroup | None = None) -> Dispatcher:
    """The dispatcher `settings.name` names, for this rank's experts (or EPLB slots)."""
    settings = settings or DispatchSettings()
    return DISPATCHERS.get(settings.name)(settings, ep_rank, ep_size, num_experts, group)


__all__ = ["AllToAllDispatcher", "DISPATCHERS", "Dispatcher", "DispatchConfigError", "DispatchSettings",
           "GatherDispatcher", "LocalDispatcher", "SizeRoutedDispatcher", "WIRES", "build_dispatcher", "combine",
           "register_dispatcher", "wire_row_bytes"]
