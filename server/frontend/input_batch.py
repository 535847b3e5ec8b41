"""What the front end sends the engine core in one event-loop turn, as one InputFrame.

Adds, aborts, expert-load calls and policy switches queued during a turn go out together
(messages.py). Encoding can fail on a value msgpack cannot hold (an integer past 64 bits,
say): then every item is encoded on its own, the ones that cannot be are handed back to be
refused with the reason, and the rest still go out. The queue is emptied before encoding, so a
bad item can never stay queued and fail every later frame (it once did: one switch with
seed=2**64 left every later call, Generate included, waiting forever).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.messages import AddRequest, InputFrame, LoadCall, SwitchCall, encode

_ENCODING_ERRORS = (OverflowError, TypeError, ValueError)


@dataclass(frozen=True)
class Unpackable:
    """An item left out of the frame: `kind` "add" (its req_id) or "switch" (its call id)."""

    kind: str
    item_id: int
    reason: str


class InputBatch:
    def __init__(self) -> None:
        self.adds: list[AddRequest] = []
        self.aborts: list[int] = []  # req_ids
        self.loads: list[LoadCall] = []
        self.switches: list[SwitchCall] = []

    def __bool__(self) -> bool:
        return bool(self.adds or self.aborts or self.loads or self.switches)

    def take_frame(self, number: int) -> tuple[bytes | None, list[Unpackable]]:
        """Empty the batch into input frame `number` -> (the encoded frame, or None if nothing
        is left to send; the items left out)."""
        frame = InputFrame(number, self.adds, self.aborts, self.loads, self.switches)
        self.adds, self.aborts, self.loads, self.switches = [], [], [], []
        try:
            return encode(frame), []
        except _ENCODING_ERRORS:
            pass
        left_out: list[Unpackable] = []
        frame.adds = [a for a in frame.adds if _encodes(a, "add", a.req_id, left_out)]
        frame.switches = [s for s in frame.switches if _encodes(s, "switch", s.call_id, left_out)]
        if not (frame.adds or frame.aborts or frame.loads or frame.switches):
            return None, left_out
        return encode(frame), left_out


def _encodes(item, kind: str, item_id: int, left_out: list[Unpackable]) -> bool:
    try:
        encode(item)
    except _ENCODING_ERRORS as exc:
        left_out.append(Unpackable(kind, item_id, f"cannot be sent to the engine core ({exc})"))
        return False
    return True
