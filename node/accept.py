"""Strangers at the door: TCP connections per source, and requests that must arrive in time.

Three defences that sit below the handlers:

- `GuardedRunner`: an `AppRunner` whose sites count open TCP connections per source
  (`node.limits.source_key` of the peer address) at accept. One over the limit gets a
  `503` with a typed `busy` body and is closed before aiohttp parses a byte of it.
- Headers in time: aiohttp has no header timeout of its own, but since 3.10 its keep-alive
  timer starts when a connection is made and closes a connection still waiting for a
  complete request when it fires (partial headers do not postpone it; a running handler,
  a websocket included, is not waiting). So `keepalive_timeout` (`header_timeout_s`) is
  both the header timeout of slowloris-style clients and the idle-connection timeout.
- `body_in_time`: a middleware that reads a request's body within `body_timeout_s` and
  `client_max_size` before the handler runs (aiohttp keeps it for the handler's `read()`),
  so a slow body or one over the limit ends as a typed error, never a held handler. A
  handler that streams its body itself (gossip's `/peers`) is bounded as a whole instead;
  `/forward` calls `read_body` itself after its cheap checks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from node.limits import Held, SourceLimit, source_key
from swarm import wire
from swarm.errors import BadRequest, Busy, FrameTooLarge, SwarmError

log = logging.getLogger(__name__)


class GuardedRunner(web.AppRunner):
    """An `AppRunner` whose TCP sites admit at most `limit`'s count of connections per source."""

    def __init__(self, app: web.Application, limit: SourceLimit, **kwargs) -> None:
        super().__init__(app, **kwargs)
        self._source_limit = limit

    @property
    def server(self):  # what TCPSite hands to loop.create_server as its protocol factory
        inner = super().server
        return None if inner is None else functools.partial(_Guard, inner, self._source_limit)


class _Guard(asyncio.Protocol):
    """Holds a connection's place in the per-source count; passes everything else to aiohttp's handler."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: SourceLimit) -> None:
        self._factory = factory
        self._limit = limit
        self._inner: asyncio.Protocol | None = None
        self._held: Held | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        try:
            self._held = self._limit.acquire(source_key(peer[0] if peer else None))
        except Busy as exc:
            log.debug("refused a connection: %s", exc)
            transport.write(_busy_response(exc))  # type: ignore[attr-defined]
            transport.close()
            return
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._held is not None:
            self._held.release()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def _busy_response(exc: SwarmError) -> bytes:
    body = wire.encode(wire.error_message(exc))
    head = f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/msgpack\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


async def read_body(request: web.Request, timeout_s: float, limit: int) -> bytes:
    """The whole body within `timeout_s` and `limit` bytes, or a typed error."""
    if request.content_length is not None and request.content_length > limit:
        raise FrameTooLarge(f"a body of {request.content_length} bytes is over this node's limit of {limit}")
    try:
        return await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest(f"the request body did not arrive within {timeout_s:g} s") from None
    except web.HTTPRequestEntityTooLarge:
        raise FrameTooLarge(f"a body over this node's limit of {limit} bytes") from None


def body_in_time(
    body_timeout_s: float,
    limit: int,
    error_response: Callable[[SwarmError], web.StreamResponse],
    streamed: tuple[str, ...] = ("/peers",),
    own: tuple[str, ...] = ("/forward",),
):
    """Middleware: a request's body is read whole within `body_timeout_s` and `limit` bytes (the
    app's `client_max_size`, which aiohttp enforces while reading) before its handler runs; else a
    typed error answers it. Handlers in `streamed` read their body themselves and are bounded as a
    whole; those in `own` call `read_body` themselves, after their cheap checks (a refused
    /forward is not worth decoding: aiohttp only drains its body)."""
    """Middleware: a request's body is read whole within `body_timeout_s` and `limit` bytes (the
    app's `client_max_size`, which aiohttp enforces while reading) before its handler runs; else a
    typed error answers it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.body_exists and request.path in streamed:  # it reads `request.content` itself, quickly
            try:
                return await asyncio.wait_for(handler(request), body_timeout_s)
            except asyncio.TimeoutError:
                response = error_response(BadRequest(f"the request body did not arrive within {body_timeout_s:g} s"))
                response.force_close()
                return response
        if request.body_exists and request.path not in own:
            try:
                await read_body(request, body_timeout_s, limit)
            except SwarmError as exc:
                response = error_response(exc)
                response.force_close()  # the rest of a refused body is not worth reading
                return response
        return await handler(request)

    return middleware
