"""Planning routes and opening sessions: what `SwarmModel` and `FailoverBlocks` both need.

A `Planner` owns the client's view of the swarm (records from bootstrap peers and
mDNS), what the client measured of each peer (`client/measure.py`) and its bans.
It turns them into routing candidates ranked by measurements rather than by the
peers' own claims, plans routes and sub-routes, and opens sessions along them,
planning around hops that refuse. It knows nothing of generation: `SwarmModel`
(client/swarm.py) and `FailoverBlocks` (client/failover.py) both build on it,
so neither imports the other.

Concurrent sessions of one client spread over replicas (data parallel): the
planner counts the sessions this client has open through each peer
(`occupancy`, kept by each session's `Lease`) and plans as if a peer carrying
n of them were (1 + spread_penalty * n) times slower. A lone session so takes
the fastest route; the 16 requests of a busy `swarm serve` share the replicas
in proportion to their speed instead of piling onto one route. A peer's own
`load` in its record says the same, but a gossip round late and for every
client at once; our own sessions we know of at once, also those opened in the
same instant. A lease is taken before a session's open is awaited, so sessions
opening together already see each other.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import aiohttp

from client.measure import Measurements, StepHop, TrustConfig
from client.peers import DiscoveryOptions, SwarmView, discover
from client.session import RemoteHop, RouteSession, SessionConfig, hop_of
from swarm.errors import Busy, NoFullPrecisionRoute, NoRoute, PeerUnavailable, ShuttingDown, SwarmError, TransientError
from swarm.precision import is_full, uncovered
from swarm.records import PeerRecord
from swarm.routing import Candidate, Route, plan_route, plan_routes
from swarm.transport import Transport, round_trip

log = logging.getLogger(__name__)

ADDRESS_DOWN_S = 30.0  # an address found unreachable is not dialled again for this long...
REDIAL_S = 0.0  # ...unless every other address of a peer failed too: then those are tried again (a failure at a live
# relay can follow from one at a dead relay, mid-failover); the generation's max_attempts bounds the alternation
ADDRESSES_PROBED = 4  # a peer's addresses whose round trips are measured (a record names at most a few)


@dataclass(frozen=True)
class ClientConfig:
    wire_dtype: str = "bfloat16"
    max_attempts: int = 4  # routes tried when hops refuse (at open, or mid-generation) before giving up
    min_deadline_s: float = 1.0  # a one-token step is given max(this, deadline_factor x its usual time)
    deadline_factor: float = 10.0
    refresh_s: float = 10.0  # re-ask bootstrap peers when the view is older than this
    rtt_probes: int = 32  # at most this many peers get their round trip measured per refresh
    session: SessionConfig = field(default_factory=SessionConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    transport: Transport = field(default_factory=Transport)  # TLS pinned to each hop, or plain http by choice
    # Verified outputs (client/verification.py): the share of generations checked (README says why
    # 0.25), the seed of that choice (None: system entropy; tests fix it), how long one check may
    # take, and how many peers beyond the holders of the blocks get an accusation.
    verify_fraction: float = 0.25
    verify_seed: int | None = None
    verify_timeout_s: float = 120.0
    accuse_fanout: int = 3
    # A peer carrying n of this client's open sessions is planned as (1 + spread_penalty * n) times
    # slower: sessions spread over replicas in proportion to their speed. 0 piles every session on
    # the fastest route (they still batch there).
    spread_penalty: float = 1.0
    # Plan only hops that compute with the model's full weights (float32, bfloat16, float16), never a
    # quantized one (int8, `swarm-node --quant int8`), and re-run checked hops only on such replicas
    # (swarm/precision.py: what a declared int8 lets a liar get away with).
    full_precision: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be in [0, 1], got {self.verify_fraction!r}")
        if not (self.spread_penalty >= 0.0 and self.spread_penalty < float("inf")):  # also rejects NaN
            raise ValueError(f"spread_penalty must be finite and >= 0, got {self.spread_penalty!r}")


def claimed_throughput(record: PeerRecord) -> float:
    """What a record says of its peer's speed (blocks/s): a prior, see client/measure.py."""
    return record.throughput


def is_misbehaviour(error: BaseException) -> bool:
    """Whether a hop's failure should ban it: everything but saying it is full or leaving."""
    return isinstance(error, SwarmError) and not isinstance(error, (Busy, ShuttingDown))


def occupied(candidates: Iterable[Candidate], occupancy: Counter[str], spread_penalty: float) -> list[Candidate]:
    """`candidates` with each peer's compute scaled by the sessions this client runs through it.

    Two sessions on one peer wait for each other's steps (batched, a step of two costs less
    than two steps, but more than one), so the model is the same as `plan_routes`' spreading:
    n sessions make a peer about (1 + n) times as slow, times `spread_penalty`.
    """
    return [
        replace(c, per_block_s=c.per_block_s * (1.0 + spread_penalty * n)) if (n := occupancy.get(c.peer_id, 0)) > 0 else c
        for c in candidates
    ]


class Lease:
    """The peers one session is counted on in its planner's occupancy: `move` it when the route
    changes (opened, spliced, re-routed), `end` it when the session closes."""

    def __init__(self, occupancy: Counter[str]) -> None:
        self._occupancy = occupancy
        self.peers: tuple[str, ...] = ()

    def move(self, peers: Iterable[str]) -> None:
        new = tuple(p for p in peers if p)
        self._occupancy.update(new)
        self._occupancy.subtract(self.peers)
        for peer in self.peers:
            if self._occupancy[peer] <= 0:
                del self._occupancy[peer]  # keep the counter to the peers in use
        self.peers = new

    def end(self) -> None:
        self.move(())


class Planner:
    """Routes over the peers serving one model (by fingerprint digest), ranked by measurement."""

    def __init__(
        self,
        model_digest: str,
        num_layers: int,
        discovery: DiscoveryOptions,
        config: ClientConfig,
        *,
        claims: Callable[[PeerRecord], float] = claimed_throughput,
        clock: Callable[[], float] = time.monotonic,
        model_name: str = "",
    ) -> None:
        self.model_digest = model_digest
        self.model_name = model_name or model_digest  # for messages: the fingerprint's readable name
        self.num_layers = num_layers
        self.discovery = discovery
        self.config = config
        self.claims = claims  # a test seam: what a record claims
        self.clock = clock
        self.view = SwarmView()
        self.measurements = Measurements(config.trust)
        self.undialable = 0  # peers of this model left out at the last look: plain http, and this client dials https only
        self.occupancy: Counter[str] = Counter()  # peer id -> sessions of this client open through it (see `Lease`)
        self._refreshed: float | None = None
        self.down: dict[str, float] = {}  # address -> until when (clock) it is not dialled: a dead relay, say (`readdress`)
        self.address_rtts: dict[tuple[str, str], float] = {}  # (peer id, address) -> measured round trip: which relay is nearer
        self.avoid: Callable[[], frozenset[str]] | None = None  # peers to plan around like banned ones (client/watch.py: seen down)

    # --- the view ---------------------------------------------------------------------

    async def refresh(self, http: aiohttp.ClientSession, force: bool = False) -> None:
        """Re-read the swarm when the view is stale (or `force`), and measure new peers' round trips."""
        if not force and self._refreshed is not None and self.clock() - self._refreshed < self.config.refresh_s:
            return
        await discover(http, self.discovery, self.view, self.config.transport)
        self._refreshed = self.clock()
        mine = [r for r in self.records() if r.span]
        live = {r.peer_id for r in mine}
        self.address_rtts = {key: rtt for key, rtt in self.address_rtts.items() if key[0] in live}
        unmeasured = [r for r in mine if self.measurements.rtt(r.peer_id) is None][: self.config.rtt_probes]
        # every address of a peer with several (its relays, a LAN and a public one): the nearest is dialled
        probes = [(r, a) for r in unmeasured for a in self._up_addresses(r)[:ADDRESSES_PROBED]]
        rtts = await asyncio.gather(*(round_trip(http, address, r.peer_id, self.config.transport) for r, address in probes))
        for (record, address), rtt in zip(probes, rtts):
            if rtt is not None:
                self.address_rtts[(record.peer_id, address)] = rtt
        for record in unmeasured:
            rtt = self.address_rtts.get((record.peer_id, self.address(record) or ""))
            if rtt is not None:
                self.measurements.record_rtt(record.peer_id, rtt)

    def records(self) -> list[PeerRecord]:
        """Live records of peers serving this model at an address this client dials (a TLS client
        never dials plain http: such peers are left out, counted in `self.undialable`)."""
        mine = [r for r in self.view.table.records(time.time()) if r.model_digest == self.model_digest and r.num_layers == self.num_layers]
        dialable = [r for r in mine if self.address(r) is not None]
        if len(dialable) < len(mine):
            self.undialable = len(mine) - len(dialable)
            log.debug("left out %d peers that serve only plain http (this client dials https only)", self.undialable)
        return dialable

    def address(self, record: PeerRecord) -> str | None:
        """Of `record`'s addresses this client dials and did not find down lately, the one with the
        shortest measured round trip (unmeasured ones after, in the record's order); the first it
        dials at all when every one was down; else None."""
        up = self._up_addresses(record)
        if up:
            rtts = self.address_rtts
            return min(up, key=lambda a: (rtts.get((record.peer_id, a), math.inf), up.index(a)))
        return next((a for a in record.addresses if self.config.transport.allows(a)), None)

    def _up_addresses(self, record: PeerRecord) -> list[str]:
        now = self.clock()
        return [a for a in record.addresses if self.config.transport.allows(a) and self.down.get(a, now) <= now]

    def readdress(self, error: BaseException) -> bool:
        """`error` said a hop could not be reached at its address (`PeerUnavailable`): that address is
        not dialled for `address_down_s`, for every peer (a relay that died is dead for all the nodes
        it relayed). True when the hop's peer has another address to try: it is then not routed
        around, only reached elsewhere (the same node through its next relay)."""
        hop = hop_of(error)
        if hop is None or not hop.peer_id or not isinstance(error, PeerUnavailable):
            return False
        url = hop.url.rstrip("/")
        self.down[url] = self.clock() + ADDRESS_DOWN_S
        record = self.view.table.get(hop.peer_id)
        now = self.clock()
        others = [] if record is None else [a for a in record.addresses if self.config.transport.allows(a) and a != url]
        fresh = [a for a in others if self.down.get(a, now) <= now]
        if not fresh:  # every other address failed before: a verdict of REDIAL_S ago is worth a new try
            fresh = [a for a in others if self.down[a] - ADDRESS_DOWN_S <= now - REDIAL_S]
            for address in fresh:
                del self.down[address]
        if fresh:
            log.info("%s is down at %s; trying it at %s", hop, url, fresh[0])
        else:
            log.info("%s is down at %s and was lately at every other address it names", hop, url)
        return bool(fresh)

    def routable(self) -> list[PeerRecord]:
        """Records of peers this client may plan through: every one serving blocks, or with
        `full_precision` only those not quantized."""
        return [r for r in self.records() if r.span is not None and (is_full(r.precision) or not self.config.full_precision)]

    def candidates(self) -> list[Candidate]:
        """The planner's view of every peer it may route through; speeds as `Measurements.per_block_costs` rules."""
        records = self.routable()
        costs = self.measurements.per_block_costs(((r.peer_id, self.claims(r)) for r in records), self.clock())
        unmeasured_rtt = self.config.trust.unmeasured_rtt_s
        return [
            Candidate(
                peer_id=r.peer_id,
                start=r.span[0],
                end=r.span[1],
                per_block_s=costs[r.peer_id],
                load=min(1.0, max(0.0, r.load)),
                rtt_s=rtt if (rtt := self.measurements.rtt(r.peer_id)) is not None else unmeasured_rtt,
                model=self.model_digest,
            )
            for r in records
        ]

    # --- planning ----------------------------------------------------------------------

    def plan(self, exclude: frozenset[str] = frozenset(), start: int = 0, end: int | None = None) -> Route:
        """The best route over blocks [start, end) (default: all) avoiding `exclude` and, where possible,
        banned peers, with this client's open sessions weighing on the peers they use (`occupied`)."""
        candidates = self.candidates()
        if not candidates:
            self._check_precision(start, self.num_layers if end is None else end, exclude)
            raise NoRoute(f"no peer serves model {self.model_name}{self._served_elsewhere()}")
        candidates = occupied(candidates, self.occupancy, self.config.spread_penalty)
        try:
            return self._unbanned(lambda avoid: plan_route(candidates, self.num_layers, self.model_digest, start=start, end=end, exclude=avoid), exclude)
        except NoRoute:
            self._check_precision(start, self.num_layers if end is None else end, exclude)
            raise

    def plan_routes(self, count: int) -> list[Route]:
        """`count` routes spread over replicas (see `swarm.routing.plan_routes`), around the sessions already open."""
        candidates = occupied(self.candidates(), self.occupancy, self.config.spread_penalty)
        spread = self.config.spread_penalty
        try:
            return self._unbanned(lambda avoid: plan_routes(candidates, self.num_layers, self.model_digest, count, spread_penalty=spread, exclude=avoid), frozenset())
        except NoRoute:
            self._check_precision(0, self.num_layers, frozenset())
            raise

    def _check_precision(self, start: int, end: int, exclude: frozenset[str]) -> None:
        """Raise `NoFullPrecisionRoute` when full precision is required and blocks of [start, end) that
        quantized peers serve are served by no full-precision one outside `exclude` (why planning failed)."""
        if not self.config.full_precision:
            return
        usable = [r for r in self.records() if r.span is not None and r.peer_id not in exclude]
        full = [r.span for r in usable if is_full(r.precision)]
        quantized = [r.span for r in usable if not is_full(r.precision)]
        gaps = uncovered(full, start, end)
        unserved = [part for gap in gaps for part in uncovered(quantized, *gap)]
        only_quantized = [part for gap in gaps for part in uncovered(unserved, *gap)]  # a gap's parts quantized peers serve
        if only_quantized:
            ranges = ", ".join(f"[{a}, {b})" for a, b in only_quantized)
            nobody = f"; nobody serves {', '.join(f'[{a}, {b})' for a, b in unserved)}" if unserved else ""
            raise NoFullPrecisionRoute(
                f"only quantized (int8) peers serve blocks {ranges} of model {self.model_name}, and this client requires full precision{nobody}"
            )

    def lease(self) -> Lease:
        """A new session's place in `occupancy` (empty until `open_session` or `Lease.move` fills it)."""
        return Lease(self.occupancy)

    def _unbanned(self, plan, exclude: frozenset[str]):
        banned = (self.measurements.banned(self.clock()) | (self.avoid() if self.avoid else frozenset())) - exclude
        if banned:
            try:
                return plan(exclude | banned)
            except NoRoute as exc:
                log.info("banned peers %s are needed for a route (%s); using them", sorted(p[:8] for p in banned), exc)
        return plan(exclude)

    def _served_elsewhere(self) -> str:
        others = sorted(
            {f"{r.model.get('architecture')}-{r.model.get('shape')}-{r.model_digest[:12]}" for r in self.view.table.records(time.time()) if r.model_digest}
        )
        return f"; the swarm serves: {', '.join(others)}" if others else ""

    def plan_hops(self, exclude: frozenset[str], start: int, end: int) -> list[RemoteHop]:
        """Hops to replace a failed one over [start, end); `NoRoute` when the swarm has none."""
        return self.hops(self.plan(exclude, start, end))

    def hops(self, route: Route) -> list[RemoteHop]:
        out = []
        for hop in route.hops:
            record = self.view.table.get(hop.peer_id)
            address = None if record is None else self.address(record)
            if address is None:
                raise NoRoute(f"peer {hop.peer_id} left the swarm while planning")
            if self.config.full_precision and not is_full(record.precision):  # a route given, not planned here
                raise NoFullPrecisionRoute(f"peer {hop.peer_id} declares {record.precision}, and this client requires full precision")
            out.append(RemoteHop(address, hop.start, hop.end, hop.peer_id, record))  # its record: e.g. whether it serves the head
        return out

    # --- what the client saw -------------------------------------------------------------

    def record_step(self, route: Sequence[RemoteHop], compute_ms: Sequence[float], wall_s: float) -> None:
        """A one-token step along `route` took `wall_s`; each hop reported `compute_ms` of model time."""
        if len(route) != len(compute_ms):
            return
        hops = [StepHop(h.peer_id, h.end - h.start, ms / 1e3) for h, ms in zip(route, compute_ms) if h.peer_id]
        if len(hops) == len(route):
            self.measurements.record_step(hops, wall_s, self.clock())

    def penalize(self, error: BaseException) -> None:
        """A hop failed with `error`: ban it if that was misbehaviour (client/measure.py says which)."""
        hop = hop_of(error)
        if hop is None or not hop.peer_id or not is_misbehaviour(error):
            return
        seconds = self.measurements.ban(hop.peer_id, f"{getattr(error, 'code', 'error')}: {error}", self.clock())
        log.info("banning %s for %.0f s: %s", hop, seconds, error)

    def convict(self, peer_id: str, reason: str) -> None:
        """`peer_id` was caught sending wrong outputs: ban it for long (client/measure.py)."""
        seconds = self.measurements.convict(peer_id, reason, self.clock())
        log.warning("banning %s for %.0f s: %s", peer_id[:8], seconds, reason)

    # --- sessions ------------------------------------------------------------------------

    async def open_session(
        self, http: aiohttp.ClientSession, max_length: int, route: Route | None = None, exclude: frozenset[str] = frozenset(), lease: Lease | None = None
    ) -> RouteSession:
        """A session along `route` (or the best route avoiding `exclude`); refusing hops are excluded and the route re-planned.

        With a `lease`, the route is counted in `occupancy` from the moment it is planned (sessions
        opening at once must see each other); if no route opens, the lease goes back to where it was."""
        await self.refresh(http, force=bool(exclude))
        prior = lease.peers if lease is not None else ()
        exclude = set(exclude)
        refusals: list[str] = []
        last: Exception | None = None
        session_config = replace(self.config.session, wire_dtype=self.config.wire_dtype)
        for attempt in range(self.config.max_attempts):
            try:
                planned = route if (route is not None and attempt == 0) else self.plan(frozenset(exclude))
            except NoRoute as exc:
                if not refusals:
                    raise
                raise NoRoute(f"{exc}; refused: {'; '.join(refusals)}") from None
            session = RouteSession(http, self.hops(planned), self.model_digest, max_length, session_config, self.config.transport)
            if lease is not None:
                lease.move(planned.peers)
            try:
                return await session.__aenter__()
            except BaseException as exc:
                if lease is not None:
                    lease.move(prior)  # also when cancelled: a request gone mid-open holds nothing
                if not isinstance(exc, TransientError):
                    raise
                last = exc
                hop = hop_of(exc)
                failed = hop.peer_id if hop is not None and hop.peer_id else planned.hops[0].peer_id
                log.info("route %s refused at %s (%s); planning around it", planned, failed, exc)
                if not self.readdress(exc):  # else the same peer, at another address
                    self.penalize(exc)
                    exclude.add(failed)
                refusals.append(f"{exc.code}: {exc}")
                await self.refresh(http, force=True)
        raise NoRoute(f"no route worked after {self.config.max_attempts} attempts; last error: {last}")
