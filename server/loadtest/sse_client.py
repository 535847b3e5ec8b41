"""A minimal HTTP/1.1 client for one streaming POST, reading server-sent events.

Why not httpx: on a small machine the load generator shares the CPU with the server, and
httpx's per-event cost (pure-Python h11 parsing, several layers of async iterators) is a few
times the gRPC client's, which moved the HTTP/gRPC ratio by the load tool's own weight.
This reads the chunked body straight off an asyncio stream. It speaks just what the
OpenAI-compatible servers (uvicorn) send: a status line, headers, and a chunked or
close-delimited body of `data: ...` events.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator
from urllib.parse import urlsplit


class HttpStatusError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status


async def post_events(url: str, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
    """POST `body` as JSON to `url` and yield each `data:` event as parsed JSON (until [DONE])."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    try:
        payload = json.dumps(body).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in {
            "Host": parts.netloc, "Content-Type": "application/json", "Content-Length": str(len(payload)),
            "Accept": "text/event-stream", "Connection": "close", **headers}.items())
        writer.write(f"POST {parts.path} HTTP/1.1\r\n{head}\r\n".encode() + payload)
        status = int((await reader.readline()).split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if status != 200:
            raise HttpStatusError(status, await reader.read(4096))
        pending = b""
        async for data in _body(reader, chunked):
            pending += data
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: "):
                    continue
                if event == b"data: [DONE]":
                    return
                yield json.loads(event[6:])
    finally:
        writer.close()


async def _body(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        data = await reader.readexactly(size + 2)  # the chunk and its CRLF
        yield data[:-2]
