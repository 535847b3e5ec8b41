"""Where the EP ranks meet, and what they listen on: loopback unless the operator says otherwise.

torch's TCPStore (the rendezvous key-value store every rank reads and writes) has no
authentication, and left to itself its server listens on every interface (`*:<port>`) whatever
address the ranks were told to use; gloo and NCCL open their own listening sockets on the
interface the machine's hostname resolves to (gloo) or the first non-loopback one (NCCL).
When epserve spawns the ranks, all of them are on this machine, so:

  * rank 0 binds the store's listening socket itself, on `parallel.master_addr`:`port`
    (127.0.0.1 by default), and hands it to TCPStore (`master_listen_fd`); the other ranks
    connect to it as clients;
  * with a loopback master address, GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME name the
    loopback interface, unless the operator set them.

A non-loopback `parallel.master_addr` needs `server.allow_remote=true` (config.py). Under
torchrun (env://) the store is torchrun's, at its MASTER_ADDR/MASTER_PORT: bind it where only
the ranks can reach it; the interfaces are pinned to loopback there too when MASTER_ADDR is a
loopback address.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import torch.distributed as dist

from ..config import is_loopback

IFF_LOOPBACK = 0x8  # linux/if.h
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str) -> int:
    """A TCP port free on `host` right now."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


def loopback_interface() -> str:
    """The name of this machine's loopback interface ("lo" on Linux)."""
    for _, name in socket.if_nameindex():
        try:
            if int(Path(f"/sys/class/net/{name}/flags").read_text(), 16) & IFF_LOOPBACK:
                return name
        except (OSError, ValueError):
            continue
    return "lo"


def pin_interfaces_to_loopback(master_addr: str) -> None:
    """With a loopback master address, gloo and NCCL listen on the loopback interface only
    (an interface the operator named in the environment is kept). Call before the first
    process group is created in this process."""
    if not is_loopback(master_addr):
        return
    name = None
    for variable in INTERFACE_VARIABLES:
        if not os.environ.get(variable):
            name = name or loopback_interface()
            os.environ[variable] = name


def tcp_store(init_method: str, rank: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """The store of `tcp://host:port`: rank 0 serves it on a socket bound to host alone."""
    where = urlsplit(init_method)
    host, port = where.hostname, where.port
    if where.scheme != "tcp" or host is None or port is None:
        raise ValueError(f"expected tcp://host:port, got {init_method!r}")
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    listener = socket.create_server((host, port), family=_family(host), backlog=max(128, world_size))
    fd = listener.detach()  # the store's server owns the descriptor from here on
    try:
        return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                             master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise
