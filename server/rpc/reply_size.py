"""Keep every generation reply within server.max_message_bytes.

grpc refuses to send a message over the limit: the client gets RESOURCE_EXHAUSTED while the
server saw the call end otherwise (OK, or CANCELLED for a stream) and logged an ERROR
traceback for each. Routed experts are what grows a message: a stream's first message carries
every prompt row with `include_prompt` (num_layers x top_k x 2 bytes a row), and a unary
reply carries every row of the generation.

* A stream message that does not fit is split: its routed-expert rows go out first, in
  messages of their own holding as many rows as fit, and the last part carries the remaining
  rows with the tokens, text and final fields. Clients concatenate RoutedExperts rows across
  messages, so they see the same rows in the same order.
* Generate's single reply cannot be split. A reply over the limit is refused with
  RESOURCE_EXHAUSTED (GenerateStream is the way to get it), and the call is counted as that;
  a generation certain to overflow is stopped as soon as it is certain.
"""
from __future__ import annotations

from clients.pb import generation_pb2 as gen_pb

ENVELOPE_BYTES = 64  # a message's field tags and lengths, and the RoutedExperts header, with room to spare
ID_BYTES = 2  # RoutedExperts.ids are uint16


class ReplyTooLarge(Exception):
    """A reply that cannot be sent within server.max_message_bytes (-> RESOURCE_EXHAUSTED)."""


def split_to_fit(msg: gen_pb.GenerateResponse, limit: int) -> list[gen_pb.GenerateResponse]:
    """`msg` as one or more stream messages of at most `limit` bytes each, rows in order."""
    size = msg.ByteSize()
    if size <= limit:
        return [msg]
    rest = gen_pb.GenerateResponse()
    rest.CopyFrom(msg)
    rest.ClearField("routed_experts")
    routed = msg.routed_experts
    row = routed.num_layers * routed.top_k * ID_BYTES
    per_message = (limit - ENVELOPE_BYTES - len(msg.request_id)) // row if row else 0  # ids are ASCII
    if not msg.HasField("routed_experts") or per_message < 1 or rest.ByteSize() > limit:
        raise ReplyTooLarge(f"a stream message would be {size} bytes, over server.max_message_bytes={limit}, "
                            "and splitting its routed experts cannot bring it under")
    rows = len(routed.ids) // row
    in_last = max(0, min(rows, (limit - rest.ByteSize() - ENVELOPE_BYTES) // row))
    head = routed.ids[:(rows - in_last) * row]
    parts = []
    for start in range(0, len(head), per_message * row):
        part = gen_pb.GenerateResponse(request_id=msg.request_id)  # every message names its request
        part.routed_experts.num_layers, part.routed_experts.top_k = routed.num_layers, routed.top_k
        part.routed_experts.ids = head[start:start + per_message * row]
        parts.append(part)
    if in_last:
        rest.routed_experts.num_layers, rest.routed_experts.top_k = routed.num_layers, routed.top_k
        rest.routed_experts.ids = routed.ids[len(head):]
    parts.append(rest)
    return parts


class UnaryReply:
    """Generate's messages, merged into its one reply once the last arrives, within `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.messages: list[gen_pb.GenerateResponse] = []
        self.reply: gen_pb.GenerateResponse | None = None
        self._at_least = 0  # bytes the merged reply holds for sure: ids, text, one per token

    async def add(self, msg: gen_pb.GenerateResponse) -> None:
        self.messages.append(msg)
        self._at_least += len(msg.routed_experts.ids) + len(msg.text) + len(msg.token_ids)
        if self._at_least > self.limit:
            self._refuse(self._at_least, "at least ")
        if msg.finish_reason:
            reply = merge_messages(self.messages)
            if reply.ByteSize() > self.limit:
                self._refuse(reply.ByteSize(), "")
            self.reply = reply

    def result(self) -> gen_pb.GenerateResponse:
        """The reply (what was gathered, if the call ended before its last message)."""
        return self.reply if self.reply is not None else merge_messages(self.messages)

    def _refuse(self, size: int, qualifier: str) -> None:
        raise ReplyTooLarge(f"the reply would be {qualifier}{size} bytes, over server.max_message_bytes="
                            f"{self.limit}; GenerateStream splits routed experts over several messages")


def merge_messages(messages: list[gen_pb.GenerateResponse]) -> gen_pb.GenerateResponse:
    """A whole stream -> the single reply of Generate (n > 1: one choice per sequence)."""
    if any(m.index for m in messages):
        out = gen_pb.GenerateResponse()
        indexes = sorted({m.index for m in messages})
        for index in indexes:
            out.choices.append(_merge_one([m for m in messages if m.index == index]))
            out.choices[-1].index = index
        out.request_id = next((m.request_id for m in messages if m.request_id), "")
        return out
    return _merge_one(messages)


def _merge_one(messages: list[gen_pb.GenerateResponse]) -> gen_pb.GenerateResponse:
    """One sequence's messages -> its reply."""
    out = gen_pb.GenerateResponse()
    routed = [m.routed_experts for m in messages if m.HasField("routed_experts")]
    for m in messages:
        out.token_ids.extend(m.token_ids)
        out.logprobs.extend(m.logprobs)
        out.top_logprobs.extend(m.top_logprobs)
        out.prompt_logprobs.extend(m.prompt_logprobs)
        out.prompt_top_logprobs.extend(m.prompt_top_logprobs)
    if routed:
        out.routed_experts.num_layers, out.routed_experts.top_k = routed[0].num_layers, routed[0].top_k
        out.routed_experts.ids = b"".join(r.ids for r in routed)
    out.text = "".join(m.text for m in messages)
    if messages:
        last = messages[-1]
        out.finish_reason, out.request_id = last.finish_reason, last.request_id
        if last.HasField("usage"):
            out.usage.CopyFrom(last.usage)
    return out
