"""Whether this node can be dialled: a peer dials it back with the node's own nonce.

Two routes on every node:
- `POST /reach` (the checker): `{"peer_id", "port", "nonce"}`. The checker dials back ONLY the
  address the request came *from* (its source IP) at `port`, never an address named in the
  body, pinned to `peer_id`, and presents the nonce at `POST /reach/back`. It answers
  `{"dialable": bool, "observed": url}`. So a stranger can make a checker dial nothing but
  itself, at most once at a time and `per_source_per_minute` times a minute per source, and
  `in_flight` checks at once in all; beyond, `busy`.
- `POST /reach/back` (the node asking): `{"nonce"}` marks a nonce this node issued and still
  waits for as arrived; anything else is refused and changes nothing.

`check_dialable` asks bootstrap peers and proven peers in turn. The node believes it is
dialable only if its own nonce arrived, whatever a checker says: a lying checker can make it
believe it is *not* dialable (it then uses relays, which costs speed, not safety), never that
it is.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from node.limits import source_key
from swarm import wire
from swarm.errors import BadRequest, Busy, SwarmError
from swarm.identity import is_peer_id
from swarm.transport import Transport

log = logging.getLogger(__name__)

NONCE_BYTES = 16
MAX_BODY = 256
MAX_NONCES = 64


@dataclass(frozen=True)
class ReachConfig:
    timeout_s: float = 3.0  # the dial-back must answer within this
    per_source_per_minute: int = 6
    in_flight: int = 8  # checks running at once, all sources together

    def limits(self) -> dict[str, Any]:
        return {"timeout_s": self.timeout_s, "per_source_per_minute": self.per_source_per_minute, "in_flight": self.in_flight}


class Reachability:
    """Both roles of one node: checking others, and being checked."""

    def __init__(self, transport: Transport, config: ReachConfig | None = None) -> None:
        self.transport = transport
        self.config = config or ReachConfig()
        self._issued: dict[bytes, float] = {}  # nonce -> expires (monotonic)
        self._arrived: set[bytes] = set()
        self._checking: set[str] = set()  # sources with a check running
        self._window: dict[str, tuple[float, int]] = {}  # source -> (minute start, checks)
        self._http: aiohttp.ClientSession | None = None
        self.checks = 0  # dial-backs done for others
        self.refused = 0

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/reach", self.reach), web.post("/reach/back", self.back)]

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    # --- checker -------------------------------------------------------------------------

    async def reach(self, request: web.Request) -> web.Response:
        from node.http import error_response

        try:
            message = wire.decode(await _body(request), MAX_BODY)
            peer_id, port, nonce = wire.field(message, "peer_id", str), wire.field(message, "port", int), wire.field(message, "nonce", bytes)
            if message["type"] != "reach" or not is_peer_id(peer_id) or not 1 <= port <= 65535 or len(nonce) != NONCE_BYTES:
                raise BadRequest("reach carries a peer id, a port in 1..65535 and a 16-byte nonce")
            host = _dial_host(request.remote)
            source = source_key(request.remote)
            self._admit(source)
        except SwarmError as exc:
            self.refused += 1
            return error_response(exc)
        url = f"{self.transport.scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        try:
            dialable = await self._dial_back(url, peer_id, nonce)
        finally:
            self._checking.discard(source)
        self.checks += 1
        return web.Response(body=wire.encode({"type": "reach", "dialable": dialable, "observed": url}), content_type="application/msgpack")

    def _admit(self, source: str) -> None:
        now = time.monotonic()
        if source in self._checking:
            raise Busy("a reachability check from this source is running")
        if len(self._checking) >= self.config.in_flight:
            raise Busy("too many reachability checks at once")
        start, count = self._window.get(source, (now, 0))
        if now - start >= 60.0:
            start, count = now, 0
        if count >= self.config.per_source_per_minute:
            raise Busy(f"at most {self.config.per_source_per_minute} reachability checks a minute per source")
        if len(self._window) > 4096:  # bounds memory under a flood of sources
            self._window = {s: w for s, w in self._window.items() if now - w[0] < 60.0}
        self._window[source] = (start, count + 1)
        self._checking.add(source)

    async def _dial_back(self, url: str, peer_id: str, nonce: bytes) -> bool:
        if self._http is None:
            self._http = self.transport.client_session(limit=self.config.in_flight)
        try:
            async with self._http.post(
                f"{url}/reach/back", data=wire.encode({"type": "reach_back", "nonce": nonce}), ssl=self.transport.pin(peer_id),
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            ) as response:  # fmt: skip
                return response.status == 200
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    # --- the node being checked ------------------------------------------------------------

    async def back(self, request: web.Request) -> web.Response:
        from node.http import error_response

        try:
            message = wire.decode(await _body(request), MAX_BODY)
            nonce = wire.field(message, "nonce", bytes)
            if message["type"] != "reach_back" or self._issued.get(nonce, 0.0) < time.monotonic():
                raise BadRequest("not a nonce this node is waiting for")
        except SwarmError as exc:
            return error_response(exc)
        self._arrived.add(nonce)
        return web.Response(body=wire.encode({"type": "ok"}), content_type="application/msgpack")

    async def check(self, http: aiohttp.ClientSession, checkers: Sequence[tuple[str, str | None]], port: int, peer_id: str) -> bool | None:
        """Ask `checkers` ((url, peer id or None), in turn, at most 2 that answer) to dial this node back.
        True: a nonce of ours arrived; False: a checker answered and none did; None: nobody answered."""
        answered = 0
        for url, checker_id in checkers:
            if answered >= 2:
                break
            nonce = os.urandom(NONCE_BYTES)
            now = time.monotonic()
            self._issued = {n: t for n, t in self._issued.items() if t > now}
            if len(self._issued) >= MAX_NONCES:
                break
            self._issued[nonce] = now + self.config.timeout_s * 3
            try:
                async with http.post(
                    f"{url}/reach", data=wire.encode({"type": "reach", "peer_id": peer_id, "port": port, "nonce": nonce}),
                    ssl=self.transport.pin(checker_id), timeout=aiohttp.ClientTimeout(total=self.config.timeout_s * 3),
                ) as response:  # fmt: skip
                    if response.status != 200:
                        continue
                    wire.decode(await response.read(), MAX_BODY)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, SwarmError) as exc:
                log.debug("reachability check at %s failed: %s", url, type(exc).__name__)
                continue
            finally:
                self._issued.pop(nonce, None)
            answered += 1
            if nonce in self._arrived:
                self._arrived.discard(nonce)
                return True
        return None if answered == 0 else False


async def _body(request: web.Request) -> bytes:
    """The request's body (node/accept.py `body_in_time` read it in time already), at most MAX_BODY bytes."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequest(f"a body over {MAX_BODY} bytes")
    body = await request.read()
    if len(body) > MAX_BODY:
        raise BadRequest(f"a body over {MAX_BODY} bytes")
    return body


def _dial_host(remote: str | None) -> str:
    """The address to dial back for a request from `remote`: its IPv4 form when it came as an
    IPv4-mapped IPv6 address; a link-local one (which needs an interface, a zone) is refused."""
    try:
        ip = ipaddress.ip_address(remote or "")
    except ValueError:  # a zone id ("fe80::1%eth0"), a unix socket, or nothing
        raise BadRequest("the request's source cannot be dialled back") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_link_local:
        raise BadRequest("a link-local source cannot be dialled back")
    return str(ip)
