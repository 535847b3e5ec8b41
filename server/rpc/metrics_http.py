"""The Prometheus endpoint (server.metrics_port), served on the server's event loop.

It used to be prometheus_client's HTTP server: a thread per connection and an accept backlog
of 5. 800 scrapes at once overflowed the backlog (TCP retries, p99 17 s), and a few thousand
slow connections were a few thousand threads fighting the gRPC event loop for the GIL: health
checks stalled for seconds. Here a connection costs a coroutine, never a thread, and what
one can hold is bounded:
  * at most MAX_CONNECTIONS are served at once (fewer under a low descriptor limit: a quarter
    of RLIMIT_NOFILE); the next wait in the kernel's accept queue (listening.BACKLOG), holding no
    descriptor and no memory of this process. So slow connections can delay scrapes, never
    gRPC;
  * a connection has HEAD_TIMEOUT_S to send its request head (at most MAX_HEAD_BYTES) and
    WRITE_TIMEOUT_S to take the reply, then it is dropped;
  * scrapes that arrive while the metrics are being read share that one reading (one engine
    round trip and one render however many scrapers there are).
Only GET (or HEAD) of /metrics or / is answered; the connection closes after each reply.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import struct
from typing import Awaitable, Callable

from .listening import listening_socket

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 256
HEAD_TIMEOUT_S = 3.0  # a scraper sends its request head at once
WRITE_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 8192
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head if head_only else head + body


class MetricsHttpServer:
    """`render()` -> the exposition text; `start()` binds (OSError if it cannot), `stop()` closes."""

    def __init__(self, host: str, port: int, render: Callable[[], Awaitable[bytes]]) -> None:
        self.host, self.port = host, port
        self._render = render
        self._rendering: asyncio.Future | None = None
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        share = MAX_CONNECTIONS if descriptors == resource.RLIM_INFINITY else descriptors // 4
        self._slots = asyncio.Semaphore(max(4, min(MAX_CONNECTIONS, share)))
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._serving: set[asyncio.Task] = set()

    def start(self) -> None:
        self._sock = listening_socket(self.host, self.port)
        self._accepting = asyncio.ensure_future(self._accept())

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._serving):
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # a full house leaves the rest in the kernel's queue
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # e.g. out of descriptors: try again shortly, never spin
                self._slots.release()
                log.warning("metrics endpoint: accept failed (%s)", exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.ensure_future(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task) -> None:
        self._serving.discard(task)
        self._slots.release()

    async def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            head = await asyncio.wait_for(self._read_head(loop, conn), HEAD_TIMEOUT_S)
            if head is None:
                return
            reply = await self._reply(head)
            await asyncio.wait_for(loop.sock_sendall(conn, reply), WRITE_TIMEOUT_S)
        except (asyncio.TimeoutError, OSError):  # a slow or vanished scraper: reset, no TIME_WAIT
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            conn.close()

    @staticmethod
    async def _read_head(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes | None:
        head = b""
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            chunk = await loop.sock_recv(conn, 4096)
            if not chunk:
                return None
            head += chunk
            if len(head) > MAX_HEAD_BYTES:
                return b""
        return head

    async def _reply(self, head: bytes) -> bytes:
        if not head:
            return _response("431 Request Header Fields Too Large", b"request head too large\n")
        parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(parts) < 2:
            return _response("400 Bad Request", b"bad request line\n")
        method, path = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", b"GET /metrics\n")
        if path not in (b"/metrics", b"/"):
            return _response("404 Not Found", b"GET /metrics\n")
        return _response("200 OK", await self._shared_render(), CONTENT_TYPE, head_only=method == b"HEAD")

    async def _shared_render(self) -> bytes:
        """One render for every scrape that arrives while it runs."""
        if self._rendering is None or self._rendering.done():
            self._rendering = asyncio.ensure_future(self._render())
        return await asyncio.shield(self._rendering)
