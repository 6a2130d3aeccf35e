"""The relayed side: a node that cannot be dialled keeps relays, and serves what they splice to it.

The node holds up to `RelayConfig.count` relays at once. With each it keeps a control
websocket (`GET /relay/attach`, pinned to the relay's peer id), proving its own key by
signing the relay's fresh nonce. Its record then names the relays' URLs as its addresses
(`relayed: true`), so diallers reach it through any of them, pinned to *its* peer id.

When a relay says `dial`, the node opens a TCP connection to that relay, writes the
one-time token (swarm/relay_wire.py `data_preamble`) and serves the connection exactly
as one it accepted: its own TLS (its identity certificate) and then aiohttp, counted
against the source the relay named (node/accept.py `GuardedRunner.reverse`). A relay that
goes away is dropped at once: the node re-signs and gossips its record (`on_change`), so
diallers move to its other relays, and it attaches another relay when one is offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from node.relay_config import RelayConfig, RelayTarget
from swarm import wire
from swarm.errors import BadRequest, SwarmError
from swarm.identity import Identity
from swarm.relay_wire import attach_payload, data_preamble, is_token
from swarm.transport import Transport

log = logging.getLogger(__name__)

RETRY_S = 5.0  # a relay that refused or died is not tried again for this long (doubling, up to BACKOFF_MAX_S)
BACKOFF_MAX_S = 120.0
DIAL_CONNECT_TIMEOUT_S = 5.0

Serve = Callable[[str, bytes], asyncio.Protocol]  # (source, preamble) -> the protocol serving a reverse connection


class RelayLink:
    """The relays this node holds, and the reverse connections it serves through them."""

    def __init__(self, config: RelayConfig, identity: Identity, transport: Transport, serve: Serve, on_change: Callable[[], None]) -> None:
        self.config = config
        self.identity = identity
        self.transport = transport
        self._serve = serve
        self._on_change = on_change
        self.attached: dict[str, RelayTarget] = {}  # peer id -> relay, in attach order
        self._holds: dict[str, asyncio.Task] = {}
        self._backoff: dict[str, tuple[float, float]] = {}  # peer id -> (not before, next delay)
        self._changed = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self.dials = 0  # reverse connections opened
        self.failed_dials = 0

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(target.url for target in self.attached.values())

    async def run(self, candidates: Callable[[], Awaitable[list[RelayTarget]]]) -> None:
        """Hold relays for as long as the node runs: attach up to `count` of `candidates()`, again
        whenever one goes away (re-asking for candidates at least every few seconds while short)."""
        async with self.transport.client_session(limit=self.config.count * 4 + 8) as http:
            self._http = http
            try:
                while True:
                    if len(self._holds) < self.config.count:
                        now = time.monotonic()
                        try:
                            found = await candidates()
                        except SwarmError as exc:
                            log.info("no relay candidates: %s", exc)
                            found = []
                        for target in found:
                            if len(self._holds) >= self.config.count:
                                break
                            if target.peer_id in self._holds or self._backoff.get(target.peer_id, (0.0, 0.0))[0] > now:
                                continue
                            self._holds[target.peer_id] = asyncio.create_task(self._hold(target), name=f"relay {target.peer_id[:8]}")
                    self._changed.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), RETRY_S if len(self._holds) < self.config.count else None)
            finally:
                for task in self._holds.values():
                    task.cancel()
                await asyncio.gather(*self._holds.values(), return_exceptions=True)
                self._holds.clear()
                self._http = None

    async def _hold(self, target: RelayTarget) -> None:
        """Attach to `target` and serve its dial requests until the control socket ends."""
        assert self._http is not None
        attached = False
        try:
            async with self._http.ws_connect(
                f"{target.url}/relay/attach", ssl=self.transport.pin(target.peer_id), heartbeat=self.config.heartbeat_s,
                max_msg_size=4096, timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
            ) as ws:  # fmt: skip
                await self._attach(ws, target)
                attached = True
                self.attached[target.peer_id] = target
                self._backoff.pop(target.peer_id, None)
                log.info("relayed through %s at %s", target.peer_id, target.url)
                self._on_change()
                async for message in ws:
                    if message.type is not aiohttp.WSMsgType.BINARY:
                        break
                    self._dial(target, wire.decode(message.data, 4096))
        except (SwarmError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            log.info("relay %s at %s: %s", target.peer_id, target.url, exc or type(exc).__name__)
        finally:
            self._holds.pop(target.peer_id, None)
            if self.attached.pop(target.peer_id, None) is not None:
                log.warning("lost relay %s at %s", target.peer_id, target.url)
                self._on_change()
            _, delay = self._backoff.get(target.peer_id, (0.0, RETRY_S / 2))
            delay = RETRY_S if attached else min(BACKOFF_MAX_S, delay * 2)
            self._backoff[target.peer_id] = (time.monotonic() + delay, delay)
            self._changed.set()

    async def _attach(self, ws: aiohttp.ClientWebSocketResponse, target: RelayTarget) -> None:
        challenge = await _receive(ws)
        if challenge["type"] != "challenge" or wire.field(challenge, "relay", str) != target.peer_id:
            raise BadRequest("the relay's challenge names another relay")
        nonce = wire.field(challenge, "nonce", bytes)
        signature = self.identity.sign(attach_payload(target.peer_id, self.identity.peer_id, nonce))
        await ws.send_bytes(
            wire.encode({"type": "attach", "peer_id": self.identity.peer_id, "public_key": self.identity.public_key_bytes, "signature": signature})
        )
        answer = await _receive(ws)
        if answer["type"] != "attached":
            raise BadRequest(f"the relay did not attach: {answer.get('type')}")

    def _dial(self, target: RelayTarget, message: dict[str, Any]) -> None:
        """A `dial` from the relay: open the data connection in the background."""
        token, source = message.get("token"), message.get("source")
        if message["type"] != "dial" or not is_token(token) or not isinstance(source, str) or len(source) > 64:
            raise BadRequest("a relay sent a malformed dial")
        task = asyncio.create_task(self._dial_back(target, token, f"relay:{source}"), name="relay dial-back")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _dial_back(self, target: RelayTarget, token: str, source: str) -> None:
        parts = urlsplit(target.url)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: self._serve(source, data_preamble(token)), parts.hostname, parts.port), DIAL_CONNECT_TIMEOUT_S
            )
            self.dials += 1
        except (OSError, asyncio.TimeoutError) as exc:
            self.failed_dials += 1
            log.info("could not dial back relay %s: %s", target.peer_id, type(exc).__name__)

    def info(self) -> dict[str, Any]:
        return {"relays": [{"peer_id": t.peer_id, "url": t.url} for t in self.attached.values()], "dials": self.dials, "failed_dials": self.failed_dials}


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await ws.receive(timeout=10.0)
    if message.type is not aiohttp.WSMsgType.BINARY:
        raise BadRequest("the relay closed the control socket")
    decoded = wire.decode(message.data, 4096)
    if decoded["type"] == "error":
        raise BadRequest(f"the relay refused: {decoded.get('code')}: {decoded.get('message')}")
    return decoded
