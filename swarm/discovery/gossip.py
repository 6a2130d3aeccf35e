"""Push-pull gossip of signed peer records over HTTP: how nodes find each other beyond the LAN.

A node announces itself to its bootstrap peers as soon as it starts. Then every period
(with a little jitter, so nodes started together do not fire together) it merges a
freshly signed record of itself into its table, expires stale records and swaps tables
with its bootstrap peers, `anchors` peers of long standing and `fanout` random peers: it
POSTs its live records to `/peers`, and the receiver merges them and answers with what
the sender lacks or holds older.

Gossip dials only operator-given bootstrap URLs and proven peers: a node's table holds
records of new peers pending until their address answered with their key
(swarm/discovery/proof.py), and pending records are neither gossiped, nor answered in
`GET /peers`, nor dialled. Bootstrap peers and the longest-proven peers are in every
round, so a flood of records, however large, cannot cut honest nodes off from each other.
Records pushed to `POST /peers` are charged to the sender's IP address, records in an
answer to the peer that answered (`PeerTable`'s per-source budget). Every record is
signed by its owner, so a relay can drop records but never change them; the table
refuses the rest and counts why (`PeerTable.refused`).

Records expire unless their owner re-signs them, so a node that dies disappears from
every table within one record ttl. A node that shuts down gracefully says goodbye with a
signed tombstone (`PeerRecord.leaving`), which drops it at once wherever it is heard and
then spreads like any other record.

- `Gossip`: the loop of one node, an async context manager the node owns.
- The HTTP side (`peers_routes` on a node, `fetch_peers` for clients, the frames) is
  swarm/discovery/peers_http.py.

Failures of one exchange (refused connection, timeout, a bad answer) are counted and
logged at debug: a swarm always has some dead or misbehaving peers, and the next round
tries others. A proven peer that fails `TableConfig.max_strikes` exchanges in a row loses
its place. Errors a node sends to peers name what was wrong with their frame, never what
the network said.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp

from swarm.discovery.peers_http import (
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_RECORDS,
    FRAME_OVERHEAD,
    base,
    call_peers,
    merge_all,
    peers_frame,
    records_of,
)
from swarm.discovery.proof import ProofConfig
from swarm.errors import SwarmError
from swarm.peers import PeerTable
from swarm.records import MAX_RECORD_BYTES, PeerRecord, is_base_url
from swarm.transport import Transport

log = logging.getLogger(__name__)

_JITTER = 0.1  # a period lasts period_s * (1 +- _JITTER)


@dataclass(frozen=True)
class GossipConfig:
    """How one node gossips. The node signs its own record with `record_ttl_s`."""

    bootstrap: tuple[str, ...] = ()  # base URLs, "http://host:port"
    period_s: float = 5.0  # between rounds
    fanout: int = 3  # random peers per round
    anchors: int = 2  # peers of longest standing per round, besides the random ones and the bootstrap peers
    timeout_s: float = 3.0  # per exchange, connect to last byte
    record_ttl_s: float = 60.0  # a dead node is gone from every table within this (plus a period)
    max_frame: int = DEFAULT_MAX_FRAME  # bytes, either way
    max_records: int = DEFAULT_MAX_RECORDS  # per frame, either way
    proof: ProofConfig = ProofConfig()  # how records of new peers are proven

    def __post_init__(self) -> None:
        if isinstance(self.bootstrap, str):
            raise ValueError("bootstrap is a tuple of URLs, not one string")
        bootstrap = tuple(base(url) for url in self.bootstrap)
        for url in bootstrap:
            if not is_base_url(url):
                raise ValueError(f"bootstrap peer {url!r} is not an http(s)://host:port URL")
        object.__setattr__(self, "bootstrap", bootstrap)
        if not (self.period_s > 0 and self.timeout_s > 0 and self.fanout >= 1 and self.max_records >= 1):
            raise ValueError("period_s and timeout_s must be positive, fanout and max_records at least 1")
        if not self.record_ttl_s >= 2 * self.period_s:
            raise ValueError("record_ttl_s must span at least two periods, or records expire before their refresh spreads")
        if self.max_frame < MAX_RECORD_BYTES + FRAME_OVERHEAD:
            raise ValueError(f"max_frame must hold at least one record ({MAX_RECORD_BYTES + FRAME_OVERHEAD} bytes)")
        if self.anchors < 0:
            raise ValueError("anchors must not be negative")

    def limits(self) -> dict[str, float | int]:
        """The numbers, for /info."""
        return {
            "period_s": self.period_s,
            "fanout": self.fanout,
            "anchors": self.anchors,
            "timeout_s": self.timeout_s,
            "record_ttl_s": self.record_ttl_s,
            "max_frame": self.max_frame,
            "max_records": self.max_records,
            "proof_concurrency": self.proof.concurrency,
            "proof_timeout_s": self.proof.timeout_s,
        }


class Gossip:
    """The gossip loop of one node: announce, then push-pull with random peers every period.

    `own_record` returns this node's record, freshly signed (or the same one while it is
    young: it is called every round, and must be re-signed well before it expires); None
    while the node has none yet. `farewell`, when given, returns the signed tombstone that
    leaving the context publishes; without it, leaving the context is silent and peers
    let this node expire. The `http` session belongs to the caller.
    """

    def __init__(
        self,
        config: GossipConfig,
        table: PeerTable,
        own_record: Callable[[], PeerRecord | None],
        http: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        *,
        farewell: Callable[[], PeerRecord | None] | None = None,
        rng: random.Random | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.transport = transport or Transport()  # pins each exchange with a known peer to its id
        self.table = table
        self._own_record = own_record
        self._farewell = farewell
        self._http = http
        self._clock = clock
        self._rng = rng or random.Random()
        self.rounds = 0  # rounds finished, the first announcement included
        self.failures = 0  # exchanges that failed, all rounds and the leave included
        self._round_done = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._own: PeerRecord | None = None  # the last own record: who "itself" is when picking peers
        self._left = False
        self._kicked = asyncio.Event()

    async def __aenter__(self) -> Gossip:
        if self._task is not None or self._left:
            raise RuntimeError("a Gossip runs once")
        self._task = asyncio.create_task(self._run(), name="gossip")
        self._task.add_done_callback(_log_crash)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()
        if not self._left and self._farewell is not None:
            await self.leave()

    async def wait_rounds(self, count: int = 1) -> int:
        """Wait until `count` more rounds have finished; returns `rounds`. For tests and tools."""
        target = self.rounds + count
        async with self._round_done:
            await self._round_done.wait_for(lambda: self.rounds >= target)
        return self.rounds

    async def leave(self, record: PeerRecord | None = None) -> int:
        """Stop gossiping and publish a tombstone to every bootstrap peer and `fanout` others.

        `record` (else `farewell()`) must have `leaving` set and be newer than every record
        this node gossiped. The loop stops first, so no fresh live record follows the
        tombstone. Returns how many peers took the message; waits at most `timeout_s`.
        """
        if record is None and self._farewell is None:
            raise ValueError("leave() needs a tombstone: pass one, or give Gossip a farewell")
        if record is not None and not record.leaving:
            raise ValueError("leave() publishes a tombstone: create it with leaving=True")
        await self._stop()
        self._left = True
        if record is None:
            assert self._farewell is not None
            record = self._farewell()
        if record is None:
            log.debug("no tombstone to publish: peers will let this node expire")
            return 0
        if not record.leaving:
            raise ValueError("farewell() must return a tombstone: create it with leaving=True")
        self._own = record
        self.table.merge(record, self._clock(), source="self")
        targets = self._targets()
        frame = peers_frame([record], self.config.max_records, self.config.max_frame)
        told = sum(await asyncio.gather(*(self._push_pull(url, peer_id, frame) for url, peer_id in targets)))
        log.info("left the swarm: told %d of %d peers", told, len(targets))
        return told

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # a crash was logged by _log_crash; cancelling us still propagates

    def kick(self) -> None:
        """Run a round now: this node's record changed in a way peers must hear at once (its addresses)."""
        self._kicked.set()

    async def _run(self) -> None:
        await self._round()  # the announcement
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kicked.wait(), self.config.period_s * self._rng.uniform(1 - _JITTER, 1 + _JITTER))
            self._kicked.clear()
            await self._round()

    async def _round(self) -> None:
        now = self._clock()
        own = self._own_record()
        if own is not None:
            self._own = own
            self.table.merge(own, now, source="self")
        self.table.expire(now)
        targets = self._targets()
        frame = peers_frame(self._push_records(now), self.config.max_records, self.config.max_frame)
        done = sum(await asyncio.gather(*(self._push_pull(url, peer_id, frame) for url, peer_id in targets)))
        async with self._round_done:
            self.rounds += 1
            self._round_done.notify_all()
        log.debug("gossip round %d: %d of %d exchanges, %d peers known", self.rounds, done, len(targets), len(self.table))

    def _push_records(self, now: float) -> list[PeerRecord]:
        """Every live record, tombstones included (they must spread), own first: it is the announcement.

        The rest is shuffled so that a table too big for one frame still spreads all of it over rounds.
        """
        records = self.table.newer_than({}, now)
        self._rng.shuffle(records)
        own_id = None if self._own is None else self._own.peer_id
        records.sort(key=lambda record: record.peer_id != own_id)  # stable: own first, the rest stays shuffled
        return records

    def _targets(self) -> list[tuple[str, str | None]]:
        """(url, peer id or None) to exchange with: every bootstrap peer, `anchors` of the
        `2 * anchors` longest-proven peers, and `fanout` random others; never this node.

        Only bootstrap URLs and the table's records (proven ones, in a node's table) are
        candidates: a record nobody proved is never dialled for gossip.
        """
        own_id = None if self._own is None else self._own.peer_id
        mine = set() if self._own is None else {base(address) for address in self._own.addresses}
        bootstrap = [url for url in self.config.bootstrap if url not in mine]
        chosen: dict[str, str | None] = {url: None for url in bootstrap}
        peers = {}  # url -> peer id, of the table's live records
        for record in self.table.records(self._clock()):
            url = base(record.addresses[0])
            if record.peer_id != own_id and url not in mine:
                peers[url] = record.peer_id
        for url in set(chosen) & set(peers):
            chosen[url] = peers[url]  # a bootstrap peer we proved: its failures count against it too
        if self.config.anchors:
            standing = sorted(
                (since, url) for url, peer_id in peers.items() if (since := self.table.standing(peer_id)) is not None
            )
            oldest = [url for _, url in standing[: 2 * self.config.anchors] if url not in chosen]
            for url in self._rng.sample(oldest, min(self.config.anchors, len(oldest))):
                chosen[url] = peers[url]
        others = sorted(set(peers) - set(chosen))
        for url in self._rng.sample(others, min(self.config.fanout, len(others))):
            chosen[url] = peers[url]
        return list(chosen.items())

    async def _push_pull(self, url: str, peer_id: str | None, frame: bytes) -> bool:
        """One exchange: push `frame`, merge the answer. Whether it worked; a failure is counted,
        and costs a proven peer standing (`PeerTable.exchange_failed`)."""
        try:
            pin = self.transport.pin(peer_id)
            message = await call_peers(self._http, "POST", url, self.config.timeout_s, self.config.max_frame, frame, pin=pin)
            records = records_of(message, self.config.max_records)
        except SwarmError as error:  # PeerUnavailable, a bad answer, or the error the peer sent
            self.failures += 1
            log.debug("gossip with %s failed: %s: %s", url, error.code, error)
            if peer_id is not None:
                self.table.exchange_failed(peer_id)
            return False
        if peer_id is not None:
            self.table.exchange_ok(peer_id)
        await merge_all(self.table, records, self._clock(), origin=f"peer:{peer_id}" if peer_id else f"url:{url}")
        return True


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("gossip loop stopped: this node will expire from the swarm", exc_info=task.exception())
