"""Per-source limits: how many of something (connections, sessions, forwards) one source may hold at once.

A source is whatever key the caller picks; `source_key` turns a remote address into one.
IPv6 addresses count per /64, since one host is usually handed a whole /64 and could
otherwise take a fresh address per connection. Counters vanish at zero, so a stream of
strangers leaves nothing behind.

    connections = SourceLimit(16, "connections")
    with connections.acquire(source_key(request.remote)):   # Busy when the source is at 16
        ...
"""

from __future__ import annotations

import ipaddress

from swarm.errors import Busy


class SourceLimit:
    """At most `limit` concurrent holds per source; `limit` 0 means no limit (counting still happens)."""

    def __init__(self, limit: int, what: str) -> None:
        if limit < 0:
            raise ValueError(f"limit of {what} must be >= 0, not {limit}")
        self.limit = limit
        self.what = what
        self.refused = 0  # acquisitions refused since start (node/metrics.py)
        self._held: dict[str, int] = {}

    def acquire(self, source: str) -> Held:
        """One hold for `source`, or `Busy` when it already has `limit`. Release it once (or use `with`)."""
        count = self._held.get(source, 0)
        if self.limit and count >= self.limit:
            self.refused += 1
            raise Busy(f"too many {self.what} from {source}: the limit is {self.limit} at once")
        self._held[source] = count + 1
        return Held(self, source)

    def release(self, source: str) -> None:
        count = self._held.get(source, 0)
        if count <= 0:
            raise ValueError(f"release of {self.what} for {source}, which holds none")  # our own bug
        if count == 1:
            del self._held[source]
        else:
            self._held[source] = count - 1

    def count(self, source: str) -> int:
        return self._held.get(source, 0)

    @property
    def total(self) -> int:
        return sum(self._held.values())

    def __len__(self) -> int:
        """Sources holding at least one."""
        return len(self._held)


class Held:
    """One hold on a `SourceLimit`; `release` is idempotent, so every close path may call it."""

    __slots__ = ("_limit", "_released", "source")

    def __init__(self, limit: SourceLimit, source: str) -> None:
        self._limit = limit
        self.source = source
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limit.release(self.source)

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def source_key(address: str | None) -> str:
    """The source an address counts as: an IPv4 address, an IPv6 /64, or the text as given.

    None (a unix socket, or a transport already closed) is one shared source, `"unknown"`.
    """
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
