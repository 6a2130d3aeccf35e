"""Strangers at the door: TCP connections per source, and requests that must arrive in time.

Three defences that sit below the handlers:

- `GuardedRunner`: an `AppRunner` whose sites count open TCP connections per source
  (`node.limits.source_key` of the peer address) at accept. One over the limit gets a
  `503` with a typed `busy` body and is closed before aiohttp parses a byte of it (on a
  TLS node it is closed at once: a plaintext answer means nothing to a TLS client).
- TLS (swarm/transport.py) is done here too, not by the site: the server socket is plain
  TCP and each admitted connection is upgraded with `loop.start_tls`. So a connection
  counts against its source from accept, also while it handshakes (asyncio's own TLS
  server would hide it until the handshake is done), and the handshake of a stranger is
  bounded by `handshake_timeout_s` (the node's header timeout; asyncio's default is 60 s).
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
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from node.limits import Held, SourceLimit, source_key
from node.relay_host import RelayHost as Router
from node.relay_host import Route
from swarm import wire
from swarm.errors import BadRequest, Busy, FrameTooLarge, SwarmError

log = logging.getLogger(__name__)


class GuardedRunner(web.AppRunner):
    """An `AppRunner` whose TCP sites admit at most `limit`'s count of connections per source and,
    given `tls`, speak TLS on each (give its sites no `ssl_context` of their own)."""

    def __init__(
        self,
        app: web.Application,
        limit: SourceLimit,
        tls: ssl.SSLContext | None = None,
        handshake_timeout_s: float = 20.0,
        router: Router | None = None,
        **kwargs,
    ) -> None:
        super().__init__(app, **kwargs)
        self._source_limit = limit
        self._tls = tls
        self._handshake_timeout_s = handshake_timeout_s
        self._router = router if tls is not None else None  # a relay reads the ClientHello's name before TLS
        self._handshakes: set[asyncio.Task] = set()  # TLS upgrades in progress, cancelled at cleanup

    @property
    def server(self):  # what TCPSite hands to loop.create_server as its protocol factory
        inner = super().server
        if inner is None:
            return None
        return functools.partial(_Guard, inner, self._source_limit, self._tls, self._handshake_timeout_s, self._handshakes, self._router)

    def reverse(self, source: str, preamble: bytes) -> asyncio.Protocol:
        """The protocol of a connection this node opened to a relay, to be served as if accepted: it
        writes `preamble` first, then speaks TLS as the server, counted against `source` (the dialler
        the relay named). node/relay_link.py."""
        inner = super().server
        assert inner is not None, "reverse connections need a set-up runner"
        return _Guard(inner, self._source_limit, self._tls, self._handshake_timeout_s, self._handshakes, source=source, preamble=preamble)

    async def cleanup(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        await super().cleanup()


class _Guard(asyncio.Protocol):
    """Holds a connection's place in the per-source count, upgrades it to TLS when the node speaks
    TLS, and passes everything else to aiohttp's handler."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        limit: SourceLimit,
        tls: ssl.SSLContext | None = None,
        handshake_timeout_s: float = 20.0,
        handshakes: set[asyncio.Task] | None = None,
        router: Router | None = None,
        source: str | None = None,
        preamble: bytes = b"",
    ) -> None:
        self._factory = factory
        self._router = router
        self._source = source
        self._preamble = preamble
        self._limit = limit
        self._tls = tls
        self._handshake_timeout_s = handshake_timeout_s
        self._handshakes = handshakes if handshakes is not None else set()
        self._inner: asyncio.Protocol | None = None
        self._held: Held | None = None
        self._early: list[bytes] = []  # decrypted bytes that came with the handshake's end, before `_inner`
        self._early_eof = False
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        source = self._source or source_key(peer[0] if peer else None)
        try:
            self._held = self._limit.acquire(source)
        except Busy as exc:
            log.debug("refused a connection: %s", exc)
            if self._tls is None:
                transport.write(_busy_response(exc))  # type: ignore[attr-defined]
            transport.close()
            return
        if self._preamble:
            transport.write(self._preamble)  # type: ignore[attr-defined]
        if self._tls is None:
            self._start(transport)
            return
        # Read nothing until start_tls has put its TLS layer in place (it resumes reading).
        transport.pause_reading()  # type: ignore[attr-defined]
        task = asyncio.get_running_loop().create_task(self._handshake(transport, source), name="tls handshake")
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()

    async def _handshake(self, transport: asyncio.BaseTransport, source: str) -> None:
        assert self._tls is not None
        loop = asyncio.get_running_loop()
        if self._router is not None:
            try:
                route = await self._router.route(transport, source, self._release)  # type: ignore[arg-type]
            except asyncio.CancelledError:
                transport.close()
                self._release()
                raise
            if route is not Route.LOCAL:  # the relay owns it now (and releases its count), or closed it
                self._lost = route is Route.CLOSED
                if route is Route.CLOSED:
                    self._release()
                return
        try:
            tls = await loop.start_tls(
                transport,  # type: ignore[arg-type]
                self,
                self._tls,
                server_side=True,
                ssl_handshake_timeout=self._handshake_timeout_s,
                ssl_shutdown_timeout=self._handshake_timeout_s,
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            # No handshake in time, or not TLS at all: the raw transport is closed already.
            log.debug("TLS handshake failed: %s", type(exc).__name__)
            self._lost = True
            self._release()
            return
        except asyncio.CancelledError:
            transport.close()
            self._release()
            raise
        if self._lost or tls is None:  # the connection ended right after its handshake
            return
        self._start(tls)
        for data in self._early:
            self._inner.data_received(data)  # type: ignore[union-attr]
        self._early.clear()
        if self._early_eof and self._inner is not None:
            self._inner.eof_received()  # type: ignore[attr-defined]

    def _start(self, transport: asyncio.BaseTransport) -> None:
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._release()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
        elif self._tls is not None and not self._lost:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if self._inner is None:
            self._early_eof = self._tls is not None
            return None
        return self._inner.eof_received()

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
