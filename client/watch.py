"""`SwarmWatch`: `swarm serve`'s live view of the swarm, for the web page's map and for routing.

A bootstrap peer keeps a signed record until it expires (minutes), so its table
alone cannot say that a node died a second ago. Every `period_s` the watch
re-reads the swarm through the model's planner (the records) and asks each peer
of this model for `GET /info` (pinned to its identity, like every dial), with a
short timeout. One probe that fails marks the peer down at once, so a killed
node shows as down within one period plus the timeout; the next answer marks it
up again. What a peer's `/info` reports (load, sessions, throughput) is a claim
and only shown; what this server measured of it (client/measure.py: seconds per
block of real steps) is shown beside it.

The planner reads `down()` (its `avoid` hook) and plans around such peers while
a route exists without them, as it does with banned ones.

Probes are bounded: at most `max_peers` per round (rotating when the swarm is
larger), `concurrency` at once, each `timeout_s`, and at most `max_info_bytes`
of an answer read. Anything a peer answers is checked before it is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp

from swarm.errors import SwarmError
from swarm.records import PeerRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchConfig:
    period_s: float = 2.0  # one round (re-read the swarm, probe the peers) this often
    timeout_s: float = 1.5  # one probe's limit: a peer slower than this counts as down
    max_peers: int = 64  # peers probed per round; a larger swarm is probed in turns
    concurrency: int = 16  # probes in flight at once
    max_info_bytes: int = 256 * 1024  # an /info larger than this is refused (a real one is a few KB)

    def __post_init__(self) -> None:
        for name in ("period_s", "timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        for name in ("max_peers", "concurrency", "max_info_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Report:
    """What one peer's `/info` said of itself (claims), checked."""

    load: float | None = None
    sessions: int | None = None
    max_sessions: int | None = None
    throughput: float | None = None
    leaving: bool = False


@dataclass
class PeerHealth:
    """One peer as the watch saw it. `state`: "unknown" (not probed yet), "up", "down" or "leaving"."""

    state: str = "unknown"
    since: float = 0.0  # unix seconds of the last change of `state`
    last_probe: float = 0.0  # unix seconds
    rtt_s: float | None = None  # round trip of the last answered probe
    reason: str = ""  # why it is down
    report: Report = field(default_factory=Report)

    def answered(self, rtt_s: float, report: Report, now: float) -> None:
        self._move("leaving" if report.leaving else "up", now)
        self.rtt_s, self.report, self.reason, self.last_probe = rtt_s, report, "", now

    def failed(self, reason: str, now: float) -> None:
        self._move("down", now)
        self.reason, self.last_probe = reason, now

    def _move(self, state: str, now: float) -> None:
        if state != self.state:
            self.state, self.since = state, now

    @property
    def live(self) -> bool:
        return self.state == "up"


def parse_info(raw: object, peer_id: str) -> Report:
    """The claims of a peer's `/info` answer; `ValueError` when it is not that peer's or malformed."""
    if not isinstance(raw, dict):
        raise ValueError("/info is not an object")  # noqa: TRY004 - one error for every malformed answer
    if raw.get("peer_id") != peer_id:
        raise ValueError("/info names another peer")

    def number(key: str, low: float, high: float) -> float | None:
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return min(high, max(low, float(value)))

    def count(key: str) -> int | None:
        value = number(key, 0, 1e9)
        return None if value is None else int(value)

    return Report(
        load=number("load", 0.0, 1.0),
        sessions=count("sessions"),
        max_sessions=count("max_sessions"),
        throughput=number("throughput", 0.0, 1e12),
        leaving=raw.get("shutting_down") is True,
    )


class SwarmWatch:
    """Keeps the planner's view fresh and each peer's health, while `run()` runs (see `watching`)."""

    def __init__(self, planner, transport, config: WatchConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.planner = planner  # client/planner.py Planner: its view, measurements, and its `avoid` hook
        self.transport = transport
        self.config = config
        self.clock = clock
        self.health: dict[str, PeerHealth] = {}
        self.rounds = 0
        self.bootstrap_ok: bool | None = None  # None: not asked yet
        self.changed = asyncio.Event()  # set after every round; the page's feed waits on it
        self._turn = 0  # where the next round's probes start when the swarm exceeds max_peers

    def down(self) -> frozenset[str]:
        """Peers whose last probe failed: the planner avoids them while it can."""
        return frozenset(p for p, h in self.health.items() if h.state == "down")

    def records(self) -> list[PeerRecord]:
        return [r for r in self.planner.records() if r.span is not None]

    async def run(self) -> None:
        async with self.transport.client_session() as http:
            while True:
                began = time.monotonic()
                try:
                    await self.round(http)
                except (SwarmError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    log.debug("watch round failed: %s", exc)
                await asyncio.sleep(max(0.0, self.config.period_s - (time.monotonic() - began)))

    async def round(self, http: aiohttp.ClientSession) -> None:
        """Re-read the swarm and, at the same time, probe (up to `max_peers` of) the peers already known:
        a slow bootstrap peer (or an mDNS browse, which listens for seconds) must not delay telling
        that a node died. Peers new in the refreshed view are probed from the next round on."""
        refreshed = asyncio.ensure_future(self._refresh(http))
        try:
            known = self.records()
            if not known:  # nothing to probe yet (the first round): wait for the view
                await asyncio.shield(refreshed)
                known = self.records()
            await self._probe_all(http, self._this_turn(known))
            await refreshed
        finally:
            refreshed.cancel()
        alive = {r.peer_id for r in self.records()}
        for gone in set(self.health) - alive:  # expired or said goodbye: no longer on the map
            del self.health[gone]
        self.rounds += 1
        self.changed.set()
        self.changed = asyncio.Event()

    async def _refresh(self, http: aiohttp.ClientSession) -> None:
        try:
            await self.planner.refresh(http, force=True)
            self.bootstrap_ok = True
        except SwarmError as exc:  # every bootstrap peer unreachable: keep the old view, probe what it holds
            self.bootstrap_ok = False
            log.debug("watch: swarm view not refreshed: %s", exc)

    def _this_turn(self, records: list[PeerRecord]) -> list[PeerRecord]:
        if len(records) <= self.config.max_peers:
            return records
        start = self._turn % len(records)
        self._turn = start + self.config.max_peers
        return (records[start:] + records[:start])[: self.config.max_peers]

    async def _probe_all(self, http: aiohttp.ClientSession, records: list[PeerRecord]) -> None:
        gate = asyncio.Semaphore(self.config.concurrency)

        async def probe(record: PeerRecord) -> None:
            async with gate:
                await self.probe(http, record)

        await asyncio.gather(*(probe(r) for r in records))

    async def probe(self, http: aiohttp.ClientSession, record: PeerRecord) -> None:
        health = self.health.setdefault(record.peer_id, PeerHealth(since=self.clock()))
        address = self.planner.address(record)
        if address is None:
            health.failed("no address this server dials", self.clock())
            return
        began = time.perf_counter()
        try:
            async with http.get(
                f"{address}/info", timeout=aiohttp.ClientTimeout(total=self.config.timeout_s), ssl=self.transport.pin(record.peer_id), allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise ValueError(f"/info answered {response.status}")
                body = await _read_bounded(response, self.config.max_info_bytes)
            report = parse_info(json.loads(body), record.peer_id)
        except asyncio.TimeoutError:
            health.failed(f"no answer in {self.config.timeout_s:g} s", self.clock())
            return
        except (aiohttp.ClientError, OSError, SwarmError, ValueError) as exc:  # refused, reset, pin mismatch, bad JSON
            health.failed(type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"[:200], self.clock())
            return
        rtt = time.perf_counter() - began
        health.answered(rtt, report, self.clock())
        self.planner.measurements.record_rtt(record.peer_id, rtt)


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise ValueError(f"/info of {response.content_length} bytes (limit {limit})")
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ValueError(f"/info over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def watching(watch: SwarmWatch) -> AsyncIterator[SwarmWatch]:
    """Run `watch` in the background for the `async with` block, and hook it into its planner."""
    task = asyncio.create_task(watch.run(), name="swarm-watch")
    watch.planner.avoid = watch.down
    try:
        yield watch
    finally:
        watch.planner.avoid = None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
