"""What a process tree listens on, read from Linux's /proc (no psutil).

`/proc/net/tcp{,6}` lists every TCP socket of the network namespace with its inode;
`/proc/<pid>/fd/*` links to `socket:[inode]` for the sockets a process holds. Matching the two
gives the listening sockets of exactly the processes asked about, whoever opened them (gRPC,
torch's TCPStore, gloo, the metrics endpoint).
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"  # the TCP state column of /proc/net/tcp


def proc_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6} local address -> ipaddress (each 32-bit word is little-endian);
    an IPv4-mapped IPv6 address comes back as the IPv4 address."""
    raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8))
    address = ipaddress.ip_address(raw)
    return getattr(address, "ipv4_mapped", None) or address


def tcp_listeners() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """(address, port, socket inode) of every listening TCP socket of this network namespace."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            address, hex_port = cols[1].rsplit(":", 1)
            if cols[3] == LISTEN:
                found.append((proc_address(address), int(hex_port, 16), int(cols[9])))
    return found


def listening_addresses(port: int) -> set:
    """Local addresses of the TCP sockets listening on `port`, whichever process holds them."""
    return {address for address, p, _ in tcp_listeners() if p == port}


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (children, grandchildren, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = [pid], [pid]
    while todo:
        parent = todo.pop()
        children = [child for child, p in parents.items() if p == parent]
        tree += children
        todo += children
    return tree


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def tree_listeners(pid: int) -> dict[int, list[tuple[object, int]]]:
    """pid -> [(address, port), ...] listening TCP sockets of each process in `pid`'s tree."""
    listeners = tcp_listeners()
    out = {}
    for p in process_tree(pid):
        mine = socket_inodes(p)
        held = [(address, port) for address, port, inode in listeners if inode in mine]
        if held:
            out[p] = held
    return out
