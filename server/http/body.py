"""Read a request body as one JSON object, within a byte limit.

The limit (server.max_message_bytes, the gRPC front end's message limit) is checked against
Content-Length before anything is read and again while reading, so a huge or endless body
costs at most that much memory before its 413.
"""
from __future__ import annotations

import json
from typing import Any

from starlette.types import Receive, Scope

from .errors import HttpError


async def read_json_object(scope: Scope, receive: Receive, limit: int) -> dict[str, Any]:
    headers = dict(scope.get("headers") or ())  # any Content-Type: the body is read as JSON (curl -d sends a form type)
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"the body is {int(declared)} bytes; at most {limit} (server.max_message_bytes)")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("the client went away while sending its request")
        body += message.get("body", b"")
        if len(body) > limit:
            raise HttpError(413, f"the body is over {limit} bytes (server.max_message_bytes)")
        if not message.get("more_body", False):
            break
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, f"the body is not valid JSON ({exc})") from None
    except RecursionError:
        raise HttpError(400, "the body is not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise HttpError(400, f"the body must be a JSON object, got {type(value).__name__}")
    return value
