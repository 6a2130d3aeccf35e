"""Outbound pushes to next hops: which next hops a node accepts, and the connections it pushes on.

A node pushes each step's output straight to the next hop's session. Where it
pushes is the node's choice, not the client's: `check_next_hop` admits a `next`
only if its URL is a bare base URL that belongs to a peer serving the next
block of the same model, by the node's own peer table or by a signed record the
client passed along. Then, before any activation leaves, the connection proves
the peer's key: the node sends `prove {nonce}` and the far end must sign it with
the key whose hash is the peer id. A record naming someone else's address gets
a connection that fails that proof, and nothing else.

Pushes use their own aiohttp session (not gossip's): a per-host connection
limit, a connect timeout, and idle connections closed after `idle_s`. One
connection per (url, peer) is shared by every session that pushes there; if it
breaks, the push fails (the session owner hears which next hop failed, never
what the network said) and the next push dials again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

import aiohttp

from node.channel import Channel
from swarm import wire
from swarm.addresses import base_url
from swarm.errors import BadAddress, HopNotProven, IdentityMismatch, PeerUnavailable, SwarmError
from swarm.identity import peer_id_from_public_key, verify
from swarm.peers import PeerTable
from swarm.protocol import Message, NextHop, Proof, Prove, proof_payload
from swarm.records import PeerRecord, verify_record
from swarm.transport import PinMismatch, Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushConfig:
    connect_timeout_s: float = 5.0  # dialling a next hop
    prove_timeout_s: float = 5.0  # for its answer to `prove`
    limit_per_host: int = 4  # connections to one host (one per peer there is the norm)
    max_channels: int = 256  # open push connections in all; beyond it the least recently used goes
    idle_s: float = 30.0  # a push connection unused this long is closed (below a receiver's idle timeout)


def check_next_hop(next_hop: NextHop, end: int, model_digest: str, num_layers: int, table: PeerTable, now: float) -> PeerRecord:
    """The record that proves `next_hop` may receive this session's output, else `BadAddress`.

    `end` is where this hop's blocks end: the next peer must serve block `end` of the same
    model. Its address must be listed by its live record in `table`, or by the signed
    record the client passed (`next_hop.record`, verified here). Pure but for `now`.
    """
    if end >= num_layers:
        raise BadAddress(f"a session ending at block {end} is the route's last hop: it has no next hop")
    candidates = [table.get(next_hop.peer_id), next_hop.record]
    why = f"peer {next_hop.peer_id} is not known to this node"
    for record in candidates:
        if record is None or record.peer_id != next_hop.peer_id:
            continue
        if record is next_hop.record:
            try:
                verify_record(record, now)
            except SwarmError:
                why = f"the record given for peer {next_hop.peer_id} does not verify"
                continue
        elif not record.is_live(now):
            continue
        if next_hop.url not in (base_url(a) for a in record.addresses):
            why = f"peer {next_hop.peer_id} does not list that address"
            continue
        if record.model_digest != model_digest or record.num_layers != num_layers:
            why = f"peer {next_hop.peer_id} serves another model"
            continue
        if record.span is None or not record.span[0] <= end < record.span[1]:
            why = f"peer {next_hop.peer_id} does not serve block {end}"
            continue
        return record
    raise BadAddress(f"next hop refused: {why}")


class PushPool:
    """Proven outbound connections to next hops. An async context manager (it owns its HTTP session)."""

    def __init__(self, config: PushConfig, max_frame: int, transport: Transport | None = None) -> None:
        self.config = config
        self.max_frame = max_frame
        self.transport = transport or Transport()
        self.http: aiohttp.ClientSession | None = None
        self._channels: dict[tuple[str, str], Channel] = {}  # (url, peer id) -> proven connection
        self._dialing: dict[tuple[str, str], asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()  # readers and the idle sweeper

    async def __aenter__(self) -> PushPool:
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s, sock_connect=self.config.connect_timeout_s)
        self.http = self.transport.client_session(limit=self.config.max_channels, limit_per_host=self.config.limit_per_host, timeout=timeout)
        self._spawn(self._sweep(), "push-idle-sweeper")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __len__(self) -> int:
        return len(self._channels)

    async def push(self, hop: NextHop, message: Message) -> None:
        """Send `message` to `hop` on a proven connection: `PeerUnavailable` or `HopNotProven` naming the peer."""
        key = (hop.url, hop.peer_id)
        channel = await self._channel(hop, key)
        if not await channel.send(message):
            if self._channels.get(key) is channel:  # another task may have dialled a fresh one meanwhile
                del self._channels[key]
            raise PeerUnavailable(f"cannot reach next hop {hop.peer_id}: the connection closed")

    async def _channel(self, hop: NextHop, key: tuple[str, str]) -> Channel:
        channel = self._channels.get(key)
        if channel and not channel.closed:
            return channel
        async with self._dialing.setdefault(key, asyncio.Lock()):
            channel = self._channels.get(key)
            if channel and not channel.closed:
                return channel
            channel = await self._dial(hop)
            if len(self._channels) >= self.config.max_channels:
                await self._evict_oldest()
            self._channels[key] = channel
            self._spawn(self._read(channel, key), f"push-reader {hop.peer_id[:8]}")
            return channel

    async def _dial(self, hop: NextHop) -> Channel:
        assert self.http is not None, "PushPool used outside `async with`"
        try:
            ws = await self.http.ws_connect(
                f"{hop.url}/session", timeout=aiohttp.ClientWSTimeout(ws_close=2.0), max_msg_size=self.max_frame,
                heartbeat=None, autoping=True, compress=0, ssl=self.transport.pin(hop.peer_id),
            )  # fmt: skip
        except PinMismatch as exc:  # the TLS certificate at that address carries another key
            raise IdentityMismatch(f"next hop {hop.peer_id} at {hop.url} refused: {'another peer' if exc.got_peer else 'no identity key'} answered there") from None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            # What the network said (refused, reset, TLS...) stays here: peers only learn that it failed.
            raise PeerUnavailable(f"cannot reach next hop {hop.peer_id}") from None
        try:
            await self._prove(ws, hop)
        except BaseException:
            await ws.close()
            raise
        return Channel(ws, hop.peer_id[:8])

    async def _prove(self, ws: aiohttp.ClientWebSocketResponse, hop: NextHop) -> None:
        """The far end signs a fresh nonce with the key of `hop.peer_id`, or `HopNotProven`."""
        nonce = secrets.token_bytes(32)
        refused = HopNotProven(f"next hop {hop.peer_id} did not prove its key")
        try:
            await ws.send_bytes(wire.encode(Prove(nonce).to_wire()))
            msg = await ws.receive(timeout=self.config.prove_timeout_s)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise refused
            proof = Proof.from_wire(wire.decode(msg.data, self.max_frame))
        except (SwarmError, aiohttp.ClientError, ConnectionError, RuntimeError, asyncio.TimeoutError):
            raise refused from None
        if proof.peer_id != hop.peer_id or peer_id_from_public_key(proof.public_key) != hop.peer_id:
            raise refused
        if not verify(proof.public_key, proof.signature, proof_payload(nonce)):
            raise refused

    async def _read(self, channel: Channel, key: tuple[str, str]) -> None:
        """Drain what the next hop says on this connection (only errors it cannot route to an owner)."""
        async for msg in channel.ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                try:
                    message = wire.decode(msg.data, self.max_frame)
                except SwarmError as exc:
                    log.debug("unreadable frame from next hop %s: %s", channel.name, exc)
                    continue
                log.debug("next hop %s says %s: %s", channel.name, message.get("type"), str(message.get("message", ""))[:200])
        if self._channels.get(key) is channel:
            del self._channels[key]

    async def _evict_oldest(self) -> None:
        key = min(self._channels, key=lambda k: self._channels[k].last_used)
        await self._channels.pop(key).ws.close()

    async def _sweep(self) -> None:
        """Close push connections nobody used for `idle_s`."""
        period = max(0.05, self.config.idle_s / 4)
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - self.config.idle_s
            for key, channel in list(self._channels.items()):
                if channel.last_used < cutoff and self._channels.get(key) is channel:
                    del self._channels[key]
                    await channel.ws.close()
            for key, lock in list(self._dialing.items()):
                if key not in self._channels and not lock.locked():
                    del self._dialing[key]

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for channel in list(self._channels.values()):
            await channel.ws.close()
        self._channels.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.close()
            self.http = None
