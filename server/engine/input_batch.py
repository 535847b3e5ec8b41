"""What the front end sends the engine core in one event-loop turn, as one BATCH frame.

Adds, aborts, expert-load calls and policy switches queued during a turn go out together
(engine/ipc.py). Packing can fail on a value msgpack cannot hold (an integer past 64 bits,
say): then every item is packed on its own, the ones that cannot be are handed back to be
refused with the reason, and the rest still go out. The queue is emptied before packing, so a
bad item can never stay queued and fail every later frame (it once did: one switch with
seed=2**64 left every later call, Generate included, waiting forever).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import ipc


@dataclass(frozen=True)
class Unpackable:
    """An item left out of the frame: `kind` "add" (its req_id) or "switch" (its call id)."""

    kind: str
    item_id: int
    reason: str


class InputBatch:
    def __init__(self) -> None:
        self.adds: list[list] = []  # ipc.request_fields(...)
        self.aborts: list[int] = []  # req_ids
        self.loads: list[list] = []  # [call_id, reset]
        self.switches: list[list] = []  # [call_id, routing mapping]

    def __bool__(self) -> bool:
        return bool(self.adds or self.aborts or self.loads or self.switches)

    def take_frame(self) -> tuple[bytes | None, list[Unpackable]]:
        """Empty the batch -> (the frame, or None if nothing is left to send; the items left out)."""
        adds, aborts, loads, switches = self.adds, self.aborts, self.loads, self.switches
        self.adds, self.aborts, self.loads, self.switches = [], [], [], []
        try:
            return ipc.pack([ipc.BATCH, adds, aborts, loads, switches]), []
        except (OverflowError, TypeError, ValueError):
            pass
        left_out: list[Unpackable] = []
        adds = _packable(adds, "add", left_out)
        switches = _packable(switches, "switch", left_out)
        if not (adds or aborts or loads or switches):
            return None, left_out
        return ipc.pack([ipc.BATCH, adds, aborts, loads, switches]), left_out


def _packable(items: list[list], kind: str, left_out: list[Unpackable]) -> list[list]:
    kept = []
    for item in items:
        try:
            ipc.pack(item)
        except (OverflowError, TypeError, ValueError) as exc:
            left_out.append(Unpackable(kind, item[0], f"cannot be sent to the engine core ({exc})"))
        else:
            kept.append(item)
    return kept
