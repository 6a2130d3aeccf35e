"""A WAN on loopback: a TCP proxy that delays every byte, for tests and benchmarks.

This kernel has no netem, so latency is simulated in user space. A `DelayRelay`
listens on a local port and forwards each connection to a target address. Bytes
in each direction are held for `delay_s`, plus a uniform `jitter_s` that never
reorders them. With `bandwidth` (bytes/s) they also queue behind the bytes ahead
of them, as on a link of that rate. Put one in front of each node and pass the
relay's URL as the node's `--public-url`: every hop then crosses a "city".

The model of one direction of a link, for a chunk of n bytes read at time t:
    link_free = max(link_free, t) + n / bandwidth   (serialisation; 0 without a cap)
    deliver   = max(previous deliver, link_free + delay + jitter draw)
so a round trip through the relay costs 2 x delay plus what the bytes take to
serialise, and the order of bytes is kept.

    async with DelayRelay(("127.0.0.1", node_port), delay_s=0.010) as relay:
        url = relay.url()   # http://127.0.0.1:<relay port>

`delay_s` may be changed while the relay runs (from any thread): chunks read after
the change take the new delay, and still never overtake the ones before them.
A `RelayHost` runs relays on an event loop of its own, in a thread, so they live
as long as a swarm does whatever loop (or none) the test or benchmark runs on.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Self

CHUNK = 64 * 1024


@dataclass
class _Direction:
    """One direction of one connection: chunks in flight and the link's state."""

    jitter_s: float
    bandwidth: float | None
    rng: random.Random
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    link_free: float = 0.0
    last_deliver: float = 0.0

    def schedule(self, now: float, size: int, delay_s: float) -> float:
        """When a chunk of `size` bytes read at `now` is delivered at the far end."""
        sent = max(self.link_free, now) + (size / self.bandwidth if self.bandwidth else 0.0)
        self.link_free = sent
        jitter = self.rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0
        self.last_deliver = max(self.last_deliver, sent + delay_s + jitter)
        return self.last_deliver


class DelayRelay:
    """Listen on `host`:`port` (0: any free port) and relay each connection to `target`, delayed.

    An async context manager; `close()` drops every relayed connection (a relay that dies)."""

    def __init__(
        self,
        target: tuple[str, int],
        delay_s: float,
        *,
        jitter_s: float = 0.0,
        bandwidth: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        if delay_s < 0 or jitter_s < 0 or (bandwidth is not None and bandwidth <= 0):
            raise ValueError("delay and jitter must be >= 0 and bandwidth > 0")
        self.target = target
        self.delay_s, self.jitter_s, self.bandwidth = delay_s, jitter_s, bandwidth
        self.host, self.port = host, port
        self.rng = random.Random(seed)
        self.connections = 0  # accepted so far
        self.bytes = 0  # relayed so far, both directions
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        pipes = {asyncio.create_task(self._pipe(reader, up_writer)), asyncio.create_task(self._pipe(up_reader, writer))}
        try:
            done, rest = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            if not all(t.result() for t in done):  # a reset, not a close: the other way is dead too
                for t in rest:
                    t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        except asyncio.CancelledError:
            # close() cancels us and awaits us; a connection callback that ends cancelled is
            # reported by asyncio's streams as an error (3.11), so this one ends quietly
            pass
        finally:
            for t in pipes:
                t.cancel()
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read everything from `reader` and deliver it to `writer` on the link's schedule; False
        when the connection broke instead of closing."""
        loop = asyncio.get_running_loop()
        way = _Direction(self.jitter_s, self.bandwidth, self.rng)

        async def deliver() -> None:
            while True:
                at, data = await way.queue.get()
                pause = at - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                if data is None:  # the sender closed its side: so do we, after its last bytes
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(CHUNK):
                self.bytes += len(data)
                now = loop.time()
                way.queue.put_nowait((way.schedule(now, len(data), self.delay_s), data))
            way.queue.put_nowait((max(way.last_deliver, loop.time() + self.delay_s), None))
            await sender
            return True
        except (ConnectionError, OSError):
            return False
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)


class RelayHost:
    """`DelayRelay`s on an event loop of their own, in a daemon thread: they outlive any one loop of
    the caller's (pytest-asyncio's are per test) and serve a swarm started from plain code.

        host = RelayHost()
        relay = host.relay(("127.0.0.1", node_port), delay_s=0.030)   # started, listening
        ...
        host.close()   # every relay closed, the thread gone; idempotent"""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.relays: list[DelayRelay] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="delay-relays", daemon=True)
        self._thread.start()

    def _call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def relay(self, target: tuple[str, int], delay_s: float, **options: Any) -> DelayRelay:
        """A started relay in front of `target`; `options` as DelayRelay's (jitter_s, bandwidth, ...)."""
        relay = DelayRelay(target, delay_s, **options)
        self._call(relay.start())
        self.relays.append(relay)
        return relay

    def set_delay(self, delay_s: float) -> None:
        """Every relay's one-way delay from now on (0: loopback through the relays)."""
        if delay_s < 0:
            raise ValueError("delay must be >= 0")
        for relay in self.relays:
            relay.delay_s = delay_s

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            for relay in self.relays:
                self._call(relay.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()
