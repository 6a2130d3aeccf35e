"""The relay side: splice connections to nodes that cannot be dialled, reading nothing they carry.

A node that cannot be dialled attaches here (`GET /relay/attach`, a websocket): it signs
this relay's fresh nonce with its identity key (swarm/relay_wire.py `attach_payload`), and
the socket stays open as its control channel. From then on, a connection to this node's
port whose TLS ClientHello names the attached peer (`<peer id>.layerswarm`) is not this
node's: before any TLS of its own, the accept layer (node/accept.py) asks `route`, which
*peeks* at the first bytes (MSG_PEEK: nothing is consumed), asks the attached node to
dial back with a one-time token, and splices the two TCP connections (node/splice.py).
The dialler's TLS runs end to end with the node, pinned to the node's key: this relay
forwards ciphertext.

Not an open proxy: it relays only to nodes attached to it, only over connections those
nodes opened themselves, and it never dials anything. A ClientHello naming a peer never
relayed here gets this node's own TLS (so the dialler's pin fails, as at any address where
another peer answers); one naming a peer relayed here lately but gone is closed, so the
dialler tries that node's other relays instead of suspecting it. A data connection with a
token that is unknown, used or expired is closed. Limits: `capacity` attached nodes (beyond:
`busy`), a few per source address, `connections_per_node` spliced connections per node
(when they are all taken, a source holding fewer than the top one gets in by closing that
one's oldest: so one stranger cannot take a node's relay from its clients),
`bytes_per_s_per_node`, and a dial back within `dial_timeout_s`. Every refusal is counted
by reason (/info, /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from node.limits import source_key
from node.relay_config import RelayConfig
from node.splice import Meter, Splice
from swarm import wire
from swarm.client_hello import Kind, sniff
from swarm.errors import BadRequest, Busy, SignatureInvalid, SwarmError
from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, is_peer_id, peer_id_from_public_key, verify
from swarm.relay_wire import PREAMBLE_BYTES, PREAMBLE_MAGIC, attach_payload, new_token, parse_preamble, peer_of_sni

log = logging.getLogger(__name__)

PEEK_BYTES = 16 * 1024 + 64  # a whole ClientHello (swarm/client_hello.py caps it at 16 KiB)
PEEK_RETRY_S = 0.005  # an incomplete ClientHello: look again this much later (readiness is level-triggered)
MAX_ATTACH_PER_SOURCE = 4  # nodes one source address may attach: one NAT rarely hides more volunteers
ATTACH_TIMEOUT_S = 10.0  # the attach answer must come within this
DEPARTED_S = 600.0  # a node that left is remembered this long: records naming us for it expire sooner
MAX_DEPARTED = 4096


class Route(enum.Enum):
    LOCAL = "local"  # this node's own connection: do its TLS
    TAKEN = "taken"  # spliced, or paired with a waiting dialler: the relay owns the transport now
    CLOSED = "closed"  # refused and closed


@dataclass
class Attachment:
    """One node relayed for: its control socket, its budget, its open spliced connections."""

    peer_id: str
    ws: web.WebSocketResponse
    source: str
    meter: Meter
    connections: int = 0
    by_source: Counter = field(default_factory=Counter)  # source -> its connections, spliced or being dialled back
    splices: dict[str, list[Splice]] = field(default_factory=dict)  # source -> its spliced connections, oldest first
    dials: int = 0


@dataclass
class _Dial:
    peer_id: str
    waiter: asyncio.Future  # set to the node's data transport


@dataclass
class RelayStats:
    spliced: int = 0  # connections spliced so far
    open: int = 0  # spliced connections open now
    bytes_to_nodes: int = 0
    bytes_from_nodes: int = 0
    evicted: int = 0  # spliced connections closed to make room for another source (`_evict_for`)
    refused: Counter = field(default_factory=Counter)  # reason -> count


class RelayHost:
    """What this node relays. `enabled` only for a TLS node with capacity that is not relayed itself."""

    def __init__(self, config: RelayConfig, peer_id: str, header_timeout_s: float) -> None:
        self.config = config
        self.peer_id = peer_id
        self.header_timeout_s = header_timeout_s
        self.attached: dict[str, Attachment] = {}
        self._dials: dict[str, _Dial] = {}  # token -> the dialler waiting for the node's data connection
        self.stats = RelayStats()
        self._departed: OrderedDict[str, float] = OrderedDict()  # peers relayed here lately, gone now -> when
        self.enabled = config.capacity > 0

    # --- attach ------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/relay/attach", self.attach)]

    async def attach(self, request: web.Request) -> web.StreamResponse:
        """`GET /relay/attach`: a node proves its key on this relay's nonce and stays as its control socket."""
        from node.http import error_response  # node/http.py imports the node's state, which imports us

        source = source_key(request.remote)
        try:
            self._check_room(source, None)
        except SwarmError as exc:
            self.stats.refused[exc.code] += 1
            return error_response(exc)
        ws = web.WebSocketResponse(heartbeat=self.config.heartbeat_s, max_msg_size=4096)
        await ws.prepare(request)
        nonce = os.urandom(16)
        attachment: Attachment | None = None
        try:
            await ws.send_bytes(wire.encode({"type": "challenge", "nonce": nonce, "relay": self.peer_id}))
            message = await ws.receive(timeout=ATTACH_TIMEOUT_S)
            if message.type is not WSMsgType.BINARY:
                raise BadRequest("the attach answer is one binary frame")
            peer_id = self._check_attach(wire.decode(message.data, 4096), nonce)
            self._check_room(source, peer_id)
            old = self.attached.get(peer_id)
            attachment = Attachment(peer_id, ws, source, Meter(self.config.bytes_per_s_per_node))
            self.attached[peer_id] = attachment
            if old is not None:  # the node reconnected: the newer proof wins
                await old.ws.close()
            await ws.send_bytes(wire.encode({"type": "attached", "limits": self.config.limits()}))
            log.info("relaying for %s (from %s)", peer_id, source)
            async for message in ws:  # nothing is expected from the node: heartbeats are aiohttp's
                if message.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                    raise BadRequest("a relayed node sends nothing on its control socket")
        except (SwarmError, asyncio.TimeoutError) as exc:
            error = exc if isinstance(exc, SwarmError) else BadRequest("no attach answer in time")
            self.stats.refused[error.code] += 1
            log.debug("attach refused: %s", error)
            if not ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_bytes(wire.encode(wire.error_message(error)))
        finally:
            if attachment is not None and self.attached.get(attachment.peer_id) is attachment:
                del self.attached[attachment.peer_id]
                self._departed[attachment.peer_id] = time.monotonic()
                self._departed.move_to_end(attachment.peer_id)
                while len(self._departed) > MAX_DEPARTED or next(iter(self._departed.values())) < time.monotonic() - DEPARTED_S:
                    self._departed.popitem(last=False)
                log.info("no longer relaying for %s", attachment.peer_id)
            await ws.close()
        return ws

    def _check_room(self, source: str, peer_id: str | None) -> None:
        if not self.enabled:
            raise Busy("this node relays for nobody")
        others = [a for a in self.attached.values() if a.peer_id != peer_id]
        if len(others) >= self.config.capacity:
            raise Busy(f"this relay is full ({self.config.capacity} nodes)")
        if sum(1 for a in others if a.source == source) >= MAX_ATTACH_PER_SOURCE:
            raise Busy(f"{MAX_ATTACH_PER_SOURCE} nodes from one address are relayed here already")

    def _check_attach(self, message: dict[str, Any], nonce: bytes) -> str:
        """The peer id an attach message proves, checked whole; else a typed error."""
        if message["type"] != "attach":
            raise BadRequest("expected an attach message")
        peer_id = wire.field(message, "peer_id", str)
        public_key = wire.field(message, "public_key", bytes)
        signature = wire.field(message, "signature", bytes)
        if not is_peer_id(peer_id) or len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
            raise BadRequest("attach carries a peer id, a 32-byte key and a 64-byte signature")
        if peer_id_from_public_key(public_key) != peer_id:
            raise SignatureInvalid("the attaching key does not hash to its peer id")
        if peer_id == self.peer_id:
            raise BadRequest("a relay does not relay for itself")
        if not verify(public_key, signature, attach_payload(self.peer_id, peer_id, nonce)):
            raise SignatureInvalid("the attach signature does not cover this relay's nonce")
        return peer_id

    # --- routing a fresh connection (node/accept.py) --------------------------------------

    async def route(self, transport: asyncio.Transport, source: str, release: Callable[[], None]) -> Route:
        """Decide a fresh, paused connection from `source` before any TLS: this node's own, or relayed.

        `release` frees the connection's place in the per-source count; the relay calls it when a
        connection it took closes."""
        if not self.enabled:  # this node became relayed itself (node/relaying.py)
            return Route.LOCAL
        data = await _peek(transport, self.header_timeout_s)
        if data is None:
            return Route.LOCAL  # nothing decisive in time: the node's own TLS handshake fails it as usual
        if data.startswith(PREAMBLE_MAGIC):
            return self._pair(transport, data, release)
        hello = sniff(data)
        if hello.kind is not Kind.HELLO:
            return Route.LOCAL
        peer = peer_of_sni(hello.server_name)
        if peer is None or peer == self.peer_id:
            return Route.LOCAL
        attachment = self.attached.get(peer)
        if attachment is None:
            if peer in self._departed:  # a stale record still names us: fail the dial, so the dialler tries the node's other relays
                return self._refuse(transport, "departed")
            return Route.LOCAL  # never relayed here: our own TLS, and the dialler's pin fails (identity_mismatch) as at any wrong address
        await self._relay(attachment, transport, source, release)
        return Route.TAKEN

    def _pair(self, transport: asyncio.Transport, data: bytes, release: Callable[[], None]) -> Route:
        """A relayed node's data connection: consume its preamble and hand it to the waiting dialler."""
        token = parse_preamble(data[:PREAMBLE_BYTES])
        dial = self._dials.pop(token, None) if token is not None else None
        if dial is None or dial.waiter.done():
            return self._refuse(transport, "bad_token")
        sock = transport.get_extra_info("socket")
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.setblocking(False)
            if len(dup.recv(PREAMBLE_BYTES)) != PREAMBLE_BYTES:  # peeked already: all there
                return self._refuse(transport, "bad_token")
        dial.waiter.set_result((transport, release))
        return Route.TAKEN

    async def _relay(self, attachment: Attachment, client: asyncio.Transport, source: str, release: Callable[[], None]) -> None:
        if attachment.connections >= self.config.connections_per_node and not self._evict_for(attachment, source):
            self._refuse(client, "connections")
            release()
            return
        token = new_token()
        waiter = asyncio.get_running_loop().create_future()
        self._dials[token] = _Dial(attachment.peer_id, waiter)
        attachment.connections += 1
        attachment.by_source[source] += 1

        def unhold() -> None:
            attachment.connections -= 1
            attachment.by_source[source] -= 1
            if not attachment.by_source[source]:
                del attachment.by_source[source]

        attachment.dials += 1
        try:
            await attachment.ws.send_bytes(wire.encode({"type": "dial", "token": token, "source": source}))
            node, node_release = await asyncio.wait_for(waiter, self.config.dial_timeout_s)
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            self._dials.pop(token, None)
            unhold()
            self._refuse(client, "dial_timeout")
            release()
            return
        stats = self.stats
        stats.spliced += 1
        stats.open += 1

        def counted(direction: int, n: int) -> None:
            if direction == 0:
                stats.bytes_to_nodes += n
            else:
                stats.bytes_from_nodes += n

        splices = attachment.splices.setdefault(source, [])

        def closed() -> None:
            stats.open -= 1
            unhold()
            splices.remove(splice)
            if not splices and attachment.splices.get(source) is splices:
                del attachment.splices[source]
            release()
            node_release()

        splice = Splice(client, node, attachment.meter, on_bytes=counted, on_close=closed)
        splices.append(splice)

    def _evict_for(self, attachment: Attachment, source: str) -> bool:
        """A node's connections are all taken: make room for `source` by closing the oldest spliced
        connection of the source holding the most, if that source holds at least two more than
        `source` does (max-min fairness: one source may use every free place, but a newcomer
        always gets a share, so a stranger cannot take a node's relay from its clients)."""
        spliced = {other: len(splices) for other, splices in attachment.splices.items() if splices}
        if not spliced:
            return False
        top = max(spliced, key=spliced.__getitem__)
        if top == source or attachment.by_source[top] < attachment.by_source[source] + 2:
            return False
        attachment.splices[top][0].close()  # its on_close frees the place at once
        self.stats.evicted += 1
        return attachment.connections < self.config.connections_per_node

    def _refuse(self, transport: asyncio.Transport, reason: str) -> Route:
        self.stats.refused[reason] += 1
        log.debug("relay refused a connection: %s", reason)
        transport.abort()
        return Route.CLOSED

    def info(self) -> dict[str, Any]:
        """For /info."""
        s = self.stats
        return {
            "enabled": self.enabled,
            "attached": len(self.attached),
            "nodes": {peer: {"connections": a.connections, "dials": a.dials, "bytes": a.meter.total} for peer, a in sorted(self.attached.items())},
            "open": s.open,
            "spliced": s.spliced,
            "bytes_to_nodes": s.bytes_to_nodes,
            "bytes_from_nodes": s.bytes_from_nodes,
            "evicted": s.evicted,
            "refused": dict(s.refused),
        }


async def _peek(transport: asyncio.Transport, timeout_s: float) -> bytes | None:
    """The first bytes waiting on a paused transport's socket, without consuming them: as soon as
    they decide what the connection is (a data preamble, or a whole ClientHello or not one);
    None when nothing decisive came within `timeout_s` or the peer closed."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    with socket.socket(fileno=os.dup(sock.fileno())) as dup:
        dup.setblocking(False)
        fd = dup.fileno()
        while True:
            readable = loop.create_future()
            loop.add_reader(fd, lambda ready=readable: ready.done() or ready.set_result(None))
            try:
                await asyncio.wait_for(readable, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None
            finally:
                loop.remove_reader(fd)
            try:
                data = dup.recv(PEEK_BYTES, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return None
            if not data:
                return None
            if _decided(data):
                return data
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(PEEK_RETRY_S)


def _decided(data: bytes) -> bool:
    """Whether the first bytes say what the connection is: a whole preamble, or anything else whole."""
    if data[:1] == PREAMBLE_MAGIC[:1]:
        if PREAMBLE_MAGIC.startswith(data[: len(PREAMBLE_MAGIC)]):  # still looks like a preamble
            return len(data) >= PREAMBLE_BYTES
        return True
    return sniff(data).kind is not Kind.INCOMPLETE
