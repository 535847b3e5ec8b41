"""One way to open a listening TCP socket, for every port epserve serves besides gRPC's own.

SO_REUSEADDR is set so a server restarted on its port does not wait out the previous run's
TIME_WAIT connections; on Linux it still refuses a port that another socket listens on, so a
busy port remains an error (OSError) the caller names by its config key.
"""
from __future__ import annotations

import socket

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


def listening_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A non-blocking socket bound to host:port (IPv6 when host has a colon, brackets allowed) and
    listening; raises OSError, with the socket closed, when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
