"""A budget of failed token attempts per client address, so a token cannot be guessed at the
speed the server answers (about 900 attempts a second on one connection before).

Each address (the peer's IP, or the whole peer string for other transports) has a bucket of
BURST failures that refills at PER_S a second. A call from an address whose bucket is empty
is refused before its token is judged, whatever it sends: otherwise a right guess would still
show. Calls that present the right token while the bucket holds a failure cost nothing.

The price: clients that share an address with someone failing faster than PER_S (every
client of a loopback-only server, clients behind one NAT or proxy) are refused until the
failures stop, for at most BURST / PER_S seconds after the last one. At most MAX_ADDRESSES
buckets are kept; full (refilled) ones are dropped first.
"""
from __future__ import annotations

import time

BURST = 100  # failures an address may make at once
PER_S = 10.0  # and then this many a second (about 900 were answered before)
MAX_ADDRESSES = 4096


def peer_address(peer: str) -> str:
    """grpc's peer ("ipv4:127.0.0.1:5123", "ipv6:[::1]:5123", "unix:/path") -> its address."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit("]", 1)[0].lstrip("[")
    return peer


class FailedAuthLimiter:
    def __init__(self, burst: int = BURST, per_s: float = PER_S, clock=time.monotonic) -> None:
        self.burst, self.per_s, self._clock = burst, per_s, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (failures left, when counted)

    def _left(self, address: str, now: float) -> float:
        left, since = self._buckets.get(address, (self.burst, now))
        return min(self.burst, left + (now - since) * self.per_s)

    def wait_s(self, address: str) -> float:
        """0 when the address may try a token now, else how long until it may."""
        left = self._left(address, self._clock())
        return 0.0 if left >= 1 else (1 - left) / self.per_s

    def failed(self, address: str) -> None:
        now = self._clock()
        self._buckets[address] = (self._left(address, now) - 1, now)
        if len(self._buckets) > MAX_ADDRESSES:
            self._forget(now)

    def _forget(self, now: float) -> None:
        full = [a for a in self._buckets if self._left(a, now) >= self.burst]
        for address in full or list(self._buckets)[:len(self._buckets) - MAX_ADDRESSES]:
            del self._buckets[address]
