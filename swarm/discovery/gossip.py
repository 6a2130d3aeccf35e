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
- `peers_routes`: the server side, mounted in the node's aiohttp app; no node state.
- `fetch_peers`: one GET for clients (`swarm peers`).

Failures of one exchange (refused connection, timeout, a bad answer) are counted and
logged at debug: a swarm always has some dead or misbehaving peers, and the next round
tries others. A proven peer that fails `TableConfig.max_strikes` exchanges in a row loses
its place. Errors a node sends to peers name what was wrong with their frame, never what
the network said.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import aiohttp
from aiohttp import web

from swarm import wire
from swarm.discovery.proof import PROOF_PATH, ProofConfig, proof_answer
from swarm.errors import BadRequest, FrameTooLarge, PeerUnavailable, ShuttingDown, SwarmError, error_from_code
from swarm.identity import Identity, is_peer_id
from swarm.peers import PeerTable
from swarm.records import MAX_RECORD_BYTES, PeerRecord, is_base_url

log = logging.getLogger(__name__)

PEERS_PATH = "/peers"
CONTENT_TYPE = "application/msgpack"
DEFAULT_MAX_FRAME = 1 << 20  # bytes: about 3000 typical records
DEFAULT_MAX_RECORDS = 4096  # per frame

_FRAME_OVERHEAD = 64  # bytes of a peers frame besides its records (map, type, v, list header): 30 in fact
_JITTER = 0.1  # a period lasts period_s * (1 +- _JITTER)
_MERGE_SLICE = 64  # records merged between yields to the loop: a full frame costs ~0.3 s of signature checks
_MAX_ERROR_CHARS = 200  # of a remote error message kept in ours


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
        bootstrap = tuple(_base(url) for url in self.bootstrap)
        for url in bootstrap:
            if not is_base_url(url):
                raise ValueError(f"bootstrap peer {url!r} is not an http(s)://host:port URL")
        object.__setattr__(self, "bootstrap", bootstrap)
        if not (self.period_s > 0 and self.timeout_s > 0 and self.fanout >= 1 and self.max_records >= 1):
            raise ValueError("period_s and timeout_s must be positive, fanout and max_records at least 1")
        if not self.record_ttl_s >= 2 * self.period_s:
            raise ValueError("record_ttl_s must span at least two periods, or records expire before their refresh spreads")
        if self.max_frame < MAX_RECORD_BYTES + _FRAME_OVERHEAD:
            raise ValueError(f"max_frame must hold at least one record ({MAX_RECORD_BYTES + _FRAME_OVERHEAD} bytes)")
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
    ) -> None:
        self.config = config
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
        frame = _peers_frame([record], self.config.max_records, self.config.max_frame)
        told = sum(await asyncio.gather(*(self._push_pull(url, peer_id, frame) for url, peer_id in targets)))
        log.info("left the swarm: told %d of %d peers", told, len(targets))
        return told

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # a crash was logged by _log_crash; cancelling us still propagates

    async def _run(self) -> None:
        await self._round()  # the announcement
        while True:
            await asyncio.sleep(self.config.period_s * self._rng.uniform(1 - _JITTER, 1 + _JITTER))
            await self._round()

    async def _round(self) -> None:
        now = self._clock()
        own = self._own_record()
        if own is not None:
            self._own = own
            self.table.merge(own, now, source="self")
        self.table.expire(now)
        targets = self._targets()
        frame = _peers_frame(self._push_records(now), self.config.max_records, self.config.max_frame)
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
        mine = set() if self._own is None else {_base(address) for address in self._own.addresses}
        bootstrap = [url for url in self.config.bootstrap if url not in mine]
        chosen: dict[str, str | None] = {url: None for url in bootstrap}
        peers = {}  # url -> peer id, of the table's live records
        for record in self.table.records(self._clock()):
            url = _base(record.addresses[0])
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
            message = await _call(self._http, "POST", url, self.config.timeout_s, self.config.max_frame, frame)
            records = _records_of(message, self.config.max_records)
        except SwarmError as error:  # PeerUnavailable, a bad answer, or the error the peer sent
            self.failures += 1
            log.debug("gossip with %s failed: %s: %s", url, error.code, error)
            if peer_id is not None:
                self.table.exchange_failed(peer_id)
            return False
        if peer_id is not None:
            self.table.exchange_ok(peer_id)
        await _merge_all(self.table, records, self._clock(), origin=f"peer:{peer_id}" if peer_id else f"url:{url}")
        return True


def peers_routes(
    table: PeerTable,
    clock: Callable[[], float] = time.time,
    max_frame: int = DEFAULT_MAX_FRAME,
    *,
    max_records: int = DEFAULT_MAX_RECORDS,
    rng: random.Random | None = None,
    identity: Identity | None = None,
) -> list[web.RouteDef]:
    """`POST /peers` (the receiving side of push-pull) and `GET /peers` (live records, for clients);
    with `identity`, also `GET /peers/proof?nonce=` (swarm/discovery/proof.py), signed for the
    record of `identity` held in `table` (the node's own, merged by its discovery).

    Records pushed are charged to the sender's IP address (`PeerTable`'s source budget).

    A frame refused whole is answered with an error frame (413 when too large, refused
    before its body is read; else 400) and counted in `table.refused` under its wire code
    (`frame_too_large`, `bad_request`, `unsupported_version`); each bad record inside a good
    frame is counted by the table under its own reason.
    """
    shuffler = rng or random.Random()

    async def post_peers(request: web.Request) -> web.Response:
        try:
            body = await _read_limited(request.content, request.content_length, max_frame)
            records = _records_of(wire.decode(body, max_frame), max_records)
        except BadRequest as error:
            table.refused[error.code] += 1
            log.debug("refused a peers frame from %s: %s: %s", request.remote, error.code, error)
            status = 413 if isinstance(error, FrameTooLarge) else 400
            return web.Response(status=status, body=wire.encode(wire.error_message(error)), content_type=CONTENT_TYPE)
        now = clock()
        await _merge_all(table, records, now, origin=f"ip:{request.remote}")
        news = table.newer_than(_summary(records), now)  # after the merge: what the sender sent is no news to it
        shuffler.shuffle(news)
        return web.Response(body=_peers_frame(news, max_records, max_frame), content_type=CONTENT_TYPE)

    async def get_peers(request: web.Request) -> web.Response:
        records = table.records(clock())
        return web.Response(body=_peers_frame(records, max_records, max_frame), content_type=CONTENT_TYPE)

    async def get_proof(request: web.Request) -> web.Response:
        assert identity is not None
        own = table.get(identity.peer_id)
        try:
            if own is None:
                raise ShuttingDown("this node has no live record to prove (starting or leaving)")
            body = wire.encode(proof_answer(identity, own, request.query.get("nonce")))
        except SwarmError as error:
            status = 503 if isinstance(error, ShuttingDown) else 400
            return web.Response(status=status, body=wire.encode(wire.error_message(error)), content_type=CONTENT_TYPE)
        return web.Response(body=body, content_type=CONTENT_TYPE)

    routes = [web.post(PEERS_PATH, post_peers), web.get(PEERS_PATH, get_peers)]
    if identity is not None:
        routes.append(web.get(PROOF_PATH, get_proof))
    return routes


async def fetch_peers(
    http: aiohttp.ClientSession,
    url: str,
    timeout: float,
    *,
    clock: Callable[[], float] = time.time,
    max_frame: int = DEFAULT_MAX_FRAME,
    max_records: int = DEFAULT_MAX_RECORDS,
    refused: Counter[str] | None = None,
) -> list[PeerRecord]:
    """The live records the node at `url` knows (GET /peers), each checked and verified, by peer id.

    Raises `PeerUnavailable` when `url` cannot be reached in `timeout` seconds, a
    `BadRequest` when its answer is no peers frame, or the error it answered with. Bad
    records (and tombstones) are dropped; refusals are added to `refused` by reason.
    """
    message = await _call(http, "GET", _base(url), timeout, max_frame)
    records = _records_of(message, max_records)
    checked = PeerTable()  # verifies, keeps the newest per peer, counts refusals by reason
    now = clock()
    for raw in records:
        checked.merge_wire(raw, now, source=url)
    if checked.refused:
        log.debug("dropped %d bad records from %s: %s", sum(checked.refused.values()), url, dict(checked.refused))
        if refused is not None:
            refused.update(checked.refused)
    return checked.records(now)


# --- frames -------------------------------------------------------------------------------


def _peers_frame(records: Iterable[PeerRecord], max_records: int, max_frame: int) -> bytes:
    """A peers frame of the first `records` that fit `max_records` and `max_frame` bytes."""
    wires: list[dict[str, Any]] = []
    size = _FRAME_OVERHEAD
    for record in records:
        if len(wires) == max_records:
            break
        record_size = len(record.to_bytes())  # exactly its bytes inside the frame
        if size + record_size > max_frame:
            break
        wires.append(record.to_wire())
        size += record_size
    frame = wire.encode({"type": "peers", "records": wires})
    assert len(frame) <= max_frame, "_FRAME_OVERHEAD undercounts a peers frame"
    return frame


def _records_of(message: dict[str, Any], max_records: int) -> list[object]:
    """The raw records of a decoded peers message (each still to be checked by the table)."""
    if message["type"] != "peers":
        raise BadRequest("expected a peers message")
    records = wire.field(message, "records", list)
    if len(records) > max_records:
        raise BadRequest(f"{len(records)} records in one frame is over the limit of {max_records}")
    return records


def _summary(records: list[object]) -> dict[str, float]:
    """peer id -> issued_at of what a sender pushed, as `newer_than` wants it.

    Read from the raw records without verifying them: a forged version can only keep
    news from the forger itself.
    """
    versions: dict[str, float] = {}
    for raw in records:
        if not isinstance(raw, dict):
            continue
        peer_id, issued_at = raw.get("peer_id"), raw.get("issued_at")
        if not (isinstance(peer_id, str) and is_peer_id(peer_id)):
            continue
        if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)):
            continue
        if abs(issued_at) > 2**53 or not math.isfinite(issued_at):
            continue
        versions[peer_id] = max(float(issued_at), versions.get(peer_id, -math.inf))
    return versions


async def _merge_all(table: PeerTable, records: list[object], now: float, origin: str | None = None) -> int:
    """Merge raw records, yielding to the loop now and then: signatures cost ~60 us each."""
    taken = 0
    for index, raw in enumerate(records):
        taken += table.merge_wire(raw, now, source="gossip", origin=origin)
        if index % _MERGE_SLICE == _MERGE_SLICE - 1:
            await asyncio.sleep(0)
    return taken


# --- HTTP ------------------------------------------------------------------------------------


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, timeout: float, max_frame: int, body: bytes | None = None
) -> dict[str, Any]:
    """`method` {url}/peers -> the decoded answer. Typed errors only: `PeerUnavailable` for
    anything of transport, the `BadRequest` family for a bad answer, else the error it sent."""
    headers = {"Content-Type": CONTENT_TYPE} if body is not None else None
    try:
        async with http.request(
            method,
            url + PEERS_PATH,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,  # a redirect would let a peer choose where we go next
        ) as response:
            data = await _read_limited(response.content, response.content_length, max_frame)
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        raise PeerUnavailable(f"{url} unreachable: {type(error).__name__}") from None
    try:
        message = wire.decode(data, max_frame)
    except BadRequest:
        if status != 200:  # not one of us, or not this path: say what HTTP said
            raise PeerUnavailable(f"{url} answered HTTP {status}") from None
        raise
    if message["type"] == "error":
        code, text = message.get("code"), message.get("message")
        raise error_from_code(code if isinstance(code, str) else "internal", str(text)[:_MAX_ERROR_CHARS])
    if status != 200:
        raise PeerUnavailable(f"{url} answered HTTP {status}")
    return message


async def _read_limited(stream: aiohttp.StreamReader, declared: int | None, limit: int) -> bytes:
    """A whole body of at most `limit` bytes; a declared length over it is refused unread."""
    if declared is not None and declared > limit:
        raise FrameTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    body = bytearray()
    async for chunk in stream.iter_chunked(1 << 16):
        body += chunk
        if len(body) > limit:
            raise FrameTooLarge(f"body is over the {limit}-byte limit")
    return bytes(body)


def _base(url: str) -> str:
    return url.rstrip("/")


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("gossip loop stopped: this node will expire from the swarm", exc_info=task.exception())
