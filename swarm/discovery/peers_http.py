"""The HTTP side of peer exchange: `/peers` and `/peers/proof` on a node, `fetch_peers` for
clients, and the peers frame both directions share.

- `peers_routes`: the server side, mounted in the node's aiohttp app; no node state.
  Records pushed to `POST /peers` are charged to the sender's IP address
  (`PeerTable`'s per-source budget); only proven records are answered.
- `fetch_peers`: one GET for clients (`swarm peers`) and start-up placement.
- `call_peers`, `peers_frame`, `records_of`, `merge_all`: what the gossip loop
  (swarm/discovery/gossip.py) sends and reads.

Errors a node sends to peers name what was wrong with their frame, never what the
network said.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from typing import Any, Callable, Iterable

import aiohttp
from aiohttp import web

from swarm import wire
from swarm.discovery.proof import PROOF_PATH, proof_answer
from swarm.errors import BadRequest, FrameTooLarge, IdentityMismatch, PeerUnavailable, ShuttingDown, SwarmError, error_from_code
from swarm.identity import Identity, is_peer_id
from swarm.peers import PeerTable
from swarm.records import PeerRecord
from swarm.transport import PeerPin, PinMismatch

log = logging.getLogger(__name__)

PEERS_PATH = "/peers"
CONTENT_TYPE = "application/msgpack"
DEFAULT_MAX_FRAME = 1 << 20  # bytes: about 3000 typical records
DEFAULT_MAX_RECORDS = 4096  # per frame
FRAME_OVERHEAD = 64  # bytes of a peers frame besides its records (map, type, v, list header): 30 in fact

_MERGE_SLICE = 64  # records merged between yields to the loop: a full frame costs ~0.3 s of signature checks
_MAX_ERROR_CHARS = 200  # of a remote error message kept in ours


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
            body = await read_limited(request.content, request.content_length, max_frame)
            records = records_of(wire.decode(body, max_frame), max_records)
        except BadRequest as error:
            table.refused[error.code] += 1
            log.debug("refused a peers frame from %s: %s: %s", request.remote, error.code, error)
            status = 413 if isinstance(error, FrameTooLarge) else 400
            return web.Response(status=status, body=wire.encode(wire.error_message(error)), content_type=CONTENT_TYPE)
        now = clock()
        await merge_all(table, records, now, origin=f"ip:{request.remote}")
        news = table.newer_than(_summary(records), now)  # after the merge: what the sender sent is no news to it
        shuffler.shuffle(news)
        return web.Response(body=peers_frame(news, max_records, max_frame), content_type=CONTENT_TYPE)

    async def get_peers(request: web.Request) -> web.Response:
        records = table.records(clock())
        return web.Response(body=peers_frame(records, max_records, max_frame), content_type=CONTENT_TYPE)

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
    message = await call_peers(http, "GET", base(url), timeout, max_frame)
    records = records_of(message, max_records)
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


def peers_frame(records: Iterable[PeerRecord], max_records: int, max_frame: int) -> bytes:
    """A peers frame of the first `records` that fit `max_records` and `max_frame` bytes."""
    wires: list[dict[str, Any]] = []
    size = FRAME_OVERHEAD
    for record in records:
        if len(wires) == max_records:
            break
        record_size = len(record.to_bytes())  # exactly its bytes inside the frame
        if size + record_size > max_frame:
            break
        wires.append(record.to_wire())
        size += record_size
    frame = wire.encode({"type": "peers", "records": wires})
    assert len(frame) <= max_frame, "FRAME_OVERHEAD undercounts a peers frame"
    return frame


def records_of(message: dict[str, Any], max_records: int) -> list[object]:
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


async def merge_all(table: PeerTable, records: list[object], now: float, origin: str | None = None) -> int:
    """Merge raw records, yielding to the loop now and then: signatures cost ~60 us each."""
    taken = 0
    for index, raw in enumerate(records):
        taken += table.merge_wire(raw, now, source="gossip", origin=origin)
        if index % _MERGE_SLICE == _MERGE_SLICE - 1:
            await asyncio.sleep(0)
    return taken


# --- HTTP ------------------------------------------------------------------------------------


async def call_peers(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    timeout: float,
    max_frame: int,
    body: bytes | None = None,
    pin: PeerPin | bool = True,
) -> dict[str, Any]:
    """`method` {url}/peers -> the decoded answer. Typed errors only: `PeerUnavailable` for
    anything of transport, `IdentityMismatch` when `pin` (`Transport.pin`) refused who answered,
    the `BadRequest` family for a bad answer, else the error it sent."""
    headers = {"Content-Type": CONTENT_TYPE} if body is not None else None
    try:
        async with http.request(
            method,
            url + PEERS_PATH,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,  # a redirect would let a peer choose where we go next
            ssl=pin,
        ) as response:
            data = await read_limited(response.content, response.content_length, max_frame)
            status = response.status
    except PinMismatch:
        raise IdentityMismatch(f"{url} answered with another identity") from None
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


async def read_limited(stream: aiohttp.StreamReader, declared: int | None, limit: int) -> bytes:
    """A whole body of at most `limit` bytes; a declared length over it is refused unread."""
    if declared is not None and declared > limit:
        raise FrameTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    body = bytearray()
    async for chunk in stream.iter_chunked(1 << 16):
        body += chunk
        if len(body) > limit:
            raise FrameTooLarge(f"body is over the {limit}-byte limit")
    return bytes(body)


def base(url: str) -> str:
    return url.rstrip("/")
