"""One generation's blocks, surviving hops that die, stall or refuse mid-way.

When a step fails, the hop it names is excluded and only its blocks are
re-planned: the new sub-route is spliced into the running session
(`RouteSession.replace`), its caches rebuilt from the prefix, and every healthy
hop keeps its session and cache. The failed step is then sent again; positions
address the caches, so a hop that already ran it just writes the same entries.
When no sub-route exists (or the splice itself fails), the whole route is
planned again and the prefix replayed on it as one prefill.

A node shutting down (SIGTERM) says `draining` first and keeps serving; the
session is moved off it the same way before the next step, so no step fails.

Every step gets a deadline derived from this session's measured times of steps
its size (a speculative step carries several positions: client/speculate.py),
so a node that hangs or is cut off is noticed in about `deadline_factor` steps'
time rather than at a fixed timeout. Greedy output matches a run without
the failure up to float rounding (a prefill sums in another order than steps).

Every one-token step is also a measurement: its wall time and each hop's
reported model time go to the `Planner` (a speculative step's do not: it ranks
hops by the time of one position), which ranks peers by them; a hop that
fails is banned there (client/measure.py), so later generations avoid it too.
Planning and opening sessions live in client/planner.py, which this module and
client/swarm.py both use. The generation's route is counted in the planner's
occupancy (`Lease`) from open to close and follows splices and re-routes, so
concurrent generations spread over replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
import torch

from client.planner import Planner
from client.remote_head import Candidates
from client.session import RemoteHop, RouteSession, at_hop, hop_of
from swarm.errors import NoRoute, ShuttingDown, SwarmError, TransientError
from swarm.routing import Route

log = logging.getLogger(__name__)


@dataclass
class Failover:
    """One recovery: why, what was replaced, how, and how long generation stalled for it."""

    reason: str
    failed: str  # the hop routed around
    how: str  # "splice": only the failed hop's blocks moved; "reroute": a whole new route
    replacement: str  # the hops that took over
    stall_s: float = 0.0


class FailoverBlocks:
    """All blocks of the model for one generation: `await blocks.forward(hidden, position)`."""

    def __init__(self, planner: Planner, http: aiohttp.ClientSession, max_length: int, route: Route | None = None) -> None:
        self.planner = planner
        self.http = http
        self.max_length = max_length
        self.config = planner.config
        self.first_route = route
        self.session: RouteSession | None = None
        self.exclude: set[str] = set()
        self.inputs = _Rows()  # what every position was fed, for a replay after a re-route
        self.step_times: dict[int, list[float]] = {}  # step size -> recent wall times (of steps without a recovery)
        self.failovers: list[Failover] = []
        self.clean = True  # every step ran once on the route opened first: its transcripts are one clean prefix
        self._closing: list[asyncio.Future] = []  # sessions of abandoned routes, closing in the background
        self.lease = planner.lease()  # this generation's route in the planner's occupancy

    @property
    def route(self) -> list[str]:
        return [str(h) for h in self.session.route] if self.session else []

    async def start(self) -> None:
        self.session = await self.planner.open_session(self.http, self.max_length, self.first_route, lease=self.lease)

    async def close(self) -> None:
        self.lease.end()  # at once: sessions planned while this one closes may take its place
        if self.session is not None:
            await self.session.close()
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _deadline(self, tokens: int) -> float | None:
        """A step of `tokens` positions gets `deadline_factor` times the usual time of steps its
        size (a larger size's, or the one-token time scaled by the size, until 3 were measured)."""
        usual = _usual(self.step_times, tokens)
        return None if usual is None else max(self.config.min_deadline_s, self.config.deadline_factor * usual)

    async def forward(self, hidden: torch.Tensor, start: int, output: str = "last") -> torch.Tensor | Candidates:
        """`hidden` [T, D] at `start` through the route: the last row (`output` "last") or all T rows
        ("all"), or their `Candidates` where the last hop applies the head. `start` may rewind
        (rejected drafts): every hop overwrites from there."""
        prefix = self.inputs.upto(start, hidden)
        first = len(self.failovers)  # this step's recoveries are self.failovers[first:]
        latest: tuple[Failover, float] | None = None  # this step's latest recovery and when its stall began
        for hop in self.session.take_draining():  # its node is leaving: move while it still serves
            if hop not in self.session.route:
                continue  # a re-route for another draining hop took it out already
            began = time.perf_counter()
            try:
                latest = (await self._recover(at_hop(ShuttingDown(f"{hop} is draining"), hop), prefix), began)
            except SwarmError as exc:
                log.warning("%s is draining and its blocks could not move (%s); staying on it", hop, exc)
        size = hidden.shape[0]
        for attempt in range(self.config.max_attempts + 1):
            # After a re-route in this step every cache on the new route is empty: replay the prefix.
            replay = prefix.shape[0] > 0 and any(f.how == "reroute" for f in self.failovers[first:])
            began = time.perf_counter()
            try:
                if replay and output == "last":  # one step: its last row is this step's
                    out = await self.session.forward(torch.cat([prefix, hidden]), 0, timeout=self._deadline(start + size))
                else:
                    if replay:  # the prefix first, so that the answer holds this step's rows alone
                        await self.session.forward(prefix, 0, timeout=self._deadline(start))
                    out = await self.session.forward(hidden, start, output=output, timeout=self._deadline(size))
            except TransientError as exc:
                self.clean = False
                if attempt == self.config.max_attempts:
                    raise NoRoute(f"generation failed over {attempt} times; last error: {exc}") from None
                _settle(latest, began)
                try:
                    latest = (await self._recover(exc, prefix), began)
                except TransientError as why:  # e.g. no bootstrap peer answered: the next attempt tries again
                    log.info("recovering from %s failed (%s)", exc, why)
                continue
            wall = time.perf_counter() - began
            if latest is not None:
                _settle(latest, time.perf_counter())
            else:
                self.step_times.setdefault(size, []).append(wall)
                del self.step_times[size][:-16]
                if size == 1:
                    # The planner ranks peers by one-token steps (per block); a speculative step's
                    # time is several positions' and would read as slow hops, so it is not told.
                    self.planner.record_step(self.session.route, self.session.compute_ms, wall)
            self.inputs.write(start, hidden)
            return out
        raise AssertionError("unreachable: the loop returns or raises")

    async def _recover(self, exc: TransientError, prefix: torch.Tensor) -> Failover:
        """Route around the hop `exc` names: splice a sub-route in where possible, else re-route."""
        hop = hop_of(exc)
        if not self.planner.readdress(exc):  # else: the same peer, reached at its next address (a relay died)
            if hop is not None and hop.peer_id:
                self.exclude.add(hop.peer_id)
            self.planner.penalize(exc)
        log.info("routing around %s: %s", hop, exc)
        if hop is not None and hop in self.session.route:
            for _ in range(self.config.max_attempts):
                hops: list[RemoteHop] = []  # planning itself may fail, before any hop is chosen
                try:
                    hops = await self._plan_hops(hop)
                    await self.session.replace(hop, hops, prefix)
                    self.lease.move(h.peer_id for h in self.session.route)
                    return self._record(Failover(str(exc), str(hop), "splice", " -> ".join(map(str, hops))))
                except NoRoute as why:
                    log.info("no replacement for %s alone (%s); planning a whole new route", hop, why)
                    break
                except TransientError as why:
                    culprit = hop_of(why)
                    if not self.planner.readdress(why):
                        if culprit is not None and culprit.peer_id:
                            self.exclude.add(culprit.peer_id)
                        self.planner.penalize(why)
                    if culprit is None or culprit not in hops:  # planning failed, or a hop we meant to keep failed too
                        log.info("splicing around %s failed at %s (%s); planning a whole new route", hop, culprit, why)
                        break
                    log.info("replacement %s for %s refused (%s); trying another", culprit, hop, why)
        session = await self.planner.open_session(self.http, self.max_length, exclude=frozenset(self.exclude), lease=self.lease)
        self._closing.append(asyncio.ensure_future(self.session.close()))  # a dead hop may take a while
        self.session = session
        return self._record(Failover(str(exc), str(hop or "?"), "reroute", " -> ".join(self.route)))

    def _record(self, failover: Failover) -> Failover:
        self.failovers.append(failover)
        return failover

    async def _plan_hops(self, hop: RemoteHop) -> list[RemoteHop]:
        """A sub-route for `hop`'s blocks, from a view re-read when stale (records expire
        during a long generation) and once more, fresh, if the view has none."""
        await self.planner.refresh(self.http)
        try:
            return self.planner.plan_hops(frozenset(self.exclude), hop.start, hop.end)
        except NoRoute:
            await self.planner.refresh(self.http, force=True)
            return self.planner.plan_hops(frozenset(self.exclude), hop.start, hop.end)


def _usual(times: dict[int, list[float]], size: int) -> float | None:
    """The usual (median) time of a step of `size` positions: of that size or the nearest larger
    one measured 3 times; else the nearest smaller one's scaled up by the sizes' ratio (a bound:
    a step costs at most linearly more per position); None before 3 steps of any size."""
    measured = sorted(s for s, t in times.items() if len(t) >= 3)
    if not measured:
        return None
    larger = [s for s in measured if s >= size]
    chosen = larger[0] if larger else measured[-1]
    recent = sorted(times[chosen])
    median = recent[len(recent) // 2]
    return median if chosen >= size else median * size / chosen


def _settle(latest: tuple[Failover, float] | None, now: float) -> None:
    """The stall of the latest recovery ends now (a later failure or the step's success)."""
    if latest is not None:
        failover, began = latest
        failover.stall_s = now - began


class _Rows:
    """Rows written at explicit positions into a buffer that doubles when full: appending a token's
    input costs O(1), where concatenating the whole prefix each step cost O(n) (0.7 ms a token at
    128 tokens of a 4096-wide model, measured on the GPU box)."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.length = 0

    def upto(self, end: int, like: torch.Tensor) -> torch.Tensor:
        """Rows [0, end) (a view: rows at or beyond `end` may be overwritten later)."""
        return self.data[:end] if self.data is not None else like[:0]

    def write(self, start: int, rows: torch.Tensor) -> None:
        end = start + rows.shape[0]
        if self.data is None or end > self.data.shape[0] or self.data.dtype != rows.dtype:
            grown = torch.empty((max(end, 2 * (self.data.shape[0] if self.data is not None else 16)), *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
            if self.data is not None:
                grown[: min(start, self.length)] = self.data[: min(start, self.length)]
            self.data = grown
        self.data[start:end] = rows
        self.length = end
