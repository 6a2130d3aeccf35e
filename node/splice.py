"""The relay's byte pump: two TCP connections spliced, with flow control and a bandwidth budget.

Nothing here parses what it carries: after the relay's routing decision (node/relay_host.py)
the bytes are TLS records between a dialler and the relayed node, and they go across as
they come. Each side's protocol forwards what it reads to the other transport; when the
other's write buffer passes its high-water mark, this side stops reading until it drains
(so a slow reader cannot make the relay buffer without bound); a `Meter` shared by every
connection of one relayed node pauses reading for as long as its bytes-per-second budget
needs. Either side closing closes both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Meter:
    """A token bucket of `rate` bytes per second, one second deep: `take(n)` answers how long to
    wait before reading more (0 within the budget)."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = float(rate)
        self._at = clock()
        self.total = 0  # bytes taken, for /info and /metrics

    def take(self, n: int) -> float:
        now = self._clock()
        self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate) - n
        self._at = now
        self.total += n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class Splice:
    """Bytes between `a` (the dialler) and `b` (the relayed node), both paused selector transports."""

    def __init__(
        self,
        a: asyncio.Transport,
        b: asyncio.Transport,
        meter: Meter,
        on_bytes: Callable[[int, int], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._transports = (a, b)
        self._meter = meter
        self._on_bytes = on_bytes  # (direction 0: to the node, 1: to the dialler; bytes)
        self._on_close = on_close
        self._pauses: tuple[set[str], set[str]] = (set(), set())  # why each side's reading is paused
        self._loop = asyncio.get_running_loop()
        self.closed = False
        for side, transport in enumerate(self._transports):
            transport.set_protocol(_Side(self, side))
        for transport in self._transports:
            transport.resume_reading()

    def forward(self, side: int, data: bytes) -> None:
        self._transports[1 - side].write(data)
        if self._on_bytes is not None:
            self._on_bytes(side, len(data))
        wait = self._meter.take(len(data))
        if wait > 0:
            self.pause(side, "budget")
            self._loop.call_later(wait, self.resume, side, "budget")

    def pause(self, side: int, why: str) -> None:
        reasons = self._pauses[side]
        if not reasons and not self.closed:
            self._transports[side].pause_reading()
        reasons.add(why)

    def resume(self, side: int, why: str) -> None:
        reasons = self._pauses[side]
        reasons.discard(why)
        if not reasons and not self.closed and not self._transports[side].is_closing():
            self._transports[side].resume_reading()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for transport in self._transports:
            transport.close()  # writes what is buffered first
        if self._on_close is not None:
            self._on_close()


class _Side(asyncio.Protocol):
    def __init__(self, splice: Splice, side: int) -> None:
        self._splice = splice
        self._side = side

    def data_received(self, data: bytes) -> None:
        self._splice.forward(self._side, data)

    def eof_received(self) -> bool:
        self._splice.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.close()

    def pause_writing(self) -> None:  # our transport is full: stop reading what would go into it
        self._splice.pause(1 - self._side, "backpressure")

    def resume_writing(self) -> None:
        self._splice.resume(1 - self._side, "backpressure")
