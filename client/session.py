"""An inference session across a route of nodes.

The client opens a session on every hop, each told to push its output to the
next hop's session; a step goes to the first hop and the result comes back from
the last. Every hop acknowledges each step to the client, so the client sees at
once which hop failed. Everything opened is closed on exit, also on errors and
cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Sequence

import aiohttp
import torch

from swarm import wire
from swarm.errors import BadRequest, PeerUnavailable, SwarmError, error_from_code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteHop:
    """Blocks [start, end) served by the node at `url`."""

    url: str
    start: int
    end: int
    peer_id: str = ""

    def __str__(self) -> str:
        return f"{self.peer_id[:8] or self.url}[{self.start}:{self.end})"


@dataclass(frozen=True)
class SessionConfig:
    wire_dtype: str = "bfloat16"
    max_frame: int = wire.DEFAULT_MAX_FRAME
    open_timeout_s: float = 30.0
    step_timeout_s: float = 60.0  # for one step through the whole route
    close_timeout_s: float = 1.0  # a hop that does not answer our close (cut off, dead) is dropped after this


@dataclass
class _HopState:
    hop: RemoteHop
    session_id: str
    ws: aiohttp.ClientWebSocketResponse | None = None
    reader: asyncio.Task | None = None
    acked: int = -1  # last step this hop acknowledged
    compute_ms: float = 0.0  # model time of the last acknowledged step


@dataclass
class _Pending:
    step: int
    done: asyncio.Future = field(repr=False)


class RouteSession:
    """`async with RouteSession(http, hops, model_digest, max_length) as s: hidden = await s.forward(x, 0)`."""

    def __init__(self, http: aiohttp.ClientSession, hops: Sequence[RemoteHop], model: str, max_length: int, config: SessionConfig | None = None) -> None:
        if not hops:
            raise BadRequest("a route needs at least one hop")
        for a, b in zip(hops, hops[1:]):
            if a.end != b.start:
                raise BadRequest(f"route is not contiguous: {a} then {b}")
        self.http = http
        self.model = model
        self.max_length = max_length
        self.config = config or SessionConfig()
        self.hops = [_HopState(h, secrets.token_urlsafe(12)) for h in hops]
        self._step = 0
        self._pending: dict[int, _Pending] = {}
        self._opened: dict[str, asyncio.Future] = {}
        self.broken: SwarmError | None = None  # set once a hop fails the whole session

    @property
    def route(self) -> list[RemoteHop]:
        return [h.hop for h in self.hops]

    @property
    def compute_ms(self) -> list[float]:
        """Each hop's model time for the last step it acknowledged."""
        return [h.compute_ms for h in self.hops]

    async def __aenter__(self) -> RouteSession:
        try:
            await asyncio.wait_for(self._open_all(), self.config.open_timeout_s)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _open_all(self) -> None:
        loop = asyncio.get_running_loop()
        for state in self.hops:
            try:
                state.ws = await self.http.ws_connect(
                    f"{state.hop.url.rstrip('/')}/session",
                    max_msg_size=2 * self.config.max_frame,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=self.config.close_timeout_s),
                )
            except (aiohttp.ClientError, OSError) as exc:
                error = PeerUnavailable(f"cannot reach {state.hop} at {state.hop.url}: {exc}")
                error.hop = state.hop  # which hop failed, for re-routing
                raise error from None
            state.reader = asyncio.create_task(self._read(state), name=f"session-reader {state.hop}")
        # Open from the last hop backwards so every hop's push target exists before it is used.
        for index in reversed(range(len(self.hops))):
            state = self.hops[index]
            after = self.hops[index + 1] if index + 1 < len(self.hops) else None
            message = {
                "type": "open",
                "session": state.session_id,
                "blocks": [state.hop.start, state.hop.end],
                "max_length": self.max_length,
                "dtype": self.config.wire_dtype,
                "model": self.model,
                "next": {"url": after.hop.url, "session": after.session_id} if after else None,
            }
            self._opened[state.session_id] = loop.create_future()
            await state.ws.send_bytes(wire.encode(message))
            await self._opened[state.session_id]

    async def forward(self, hidden: torch.Tensor, start: int, output: str = "last", timeout: float | None = None) -> torch.Tensor:
        """Run hidden [T, D] at position `start` through every hop; returns [1, D] ("last") or [T, D].

        A step not answered within `timeout` (default `step_timeout_s`) fails with
        `PeerUnavailable` naming the first hop that has not acknowledged it.
        """
        if self.broken is not None:
            raise self.broken
        step = self._step
        self._step += 1
        done = asyncio.get_running_loop().create_future()
        self._pending[step] = _Pending(step, done)
        first = self.hops[0]
        message = {"type": "step", "session": first.session_id, "step": step, "position": start, "output": output, "hidden": wire.pack_tensor(hidden, self.config.wire_dtype)}
        try:
            if first.ws is None or first.ws.closed:
                raise PeerUnavailable(f"connection to {first.hop} is closed")
            await first.ws.send_bytes(wire.encode(message))
            return await asyncio.wait_for(done, timeout or self.config.step_timeout_s)
        except asyncio.TimeoutError:
            laggard = next((s.hop for s in self.hops if s.acked < step), self.hops[-1].hop)
            error = PeerUnavailable(f"step {step} timed out after {timeout or self.config.step_timeout_s:g} s waiting for {laggard}")
            error.hop = laggard
            raise error from None
        finally:
            self._pending.pop(step, None)

    async def _read(self, state: _HopState) -> None:
        assert state.ws is not None
        try:
            async for msg in state.ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    self._dispatch(state, wire.decode(msg.data, self.config.max_frame))
                except SwarmError as exc:
                    self._fail_all(exc)
                except (ValueError, TypeError, KeyError) as exc:  # a node that breaks the protocol
                    self._fail_all(BadRequest(f"{state.hop} sent a malformed message: {type(exc).__name__}"))
        finally:
            if state.ws.close_code is not None or state.ws.closed:
                error = PeerUnavailable(f"{state.hop} closed the connection")
                error.hop = state.hop
                self._fail_all(error)

    def _dispatch(self, state: _HopState, message: dict[str, Any]) -> None:
        kind = message["type"]
        step = message.get("step")
        if kind == "opened":
            _resolve(self._opened.get(message.get("session")), None)
        elif kind in ("ack", "result"):
            state.acked = max(state.acked, int(step))
            state.compute_ms = float(message.get("compute_ms", 0.0))
        if kind == "result":
            pending = self._pending.get(step)
            if pending:
                _resolve(pending.done, wire.unpack_tensor(message.get("hidden")))
        if kind == "error":
            error = error_from_code(str(message.get("code")), f"{state.hop}: {message.get('message')}")
            # which hop failed, for re-routing: the reporter, or the next hop it could not push to
            error.hop = next((h.hop for h in self.hops if h.hop.url == message.get("hop")), state.hop)
            opened = self._opened.get(message.get("session"))
            if opened is not None and not opened.done():
                _fail(opened, error)
            elif isinstance(step, int) and step in self._pending:
                _fail(self._pending[step].done, error)
            else:
                self._fail_all(error)

    def _fail_all(self, error: SwarmError) -> None:
        if self.broken is None:
            self.broken = error
        for future in list(self._opened.values()) + [p.done for p in self._pending.values()]:
            _fail(future, error)

    async def close(self) -> None:
        """Close every hop's session and connection. Safe to call twice."""
        for state in self.hops:
            ws = state.ws
            if ws is not None and not ws.closed:
                try:
                    await ws.send_bytes(wire.encode({"type": "close", "session": state.session_id}))
                    await ws.close()
                except (ConnectionError, RuntimeError, aiohttp.ClientError):
                    pass
            if state.reader is not None:
                state.reader.cancel()
        await asyncio.gather(*(s.reader for s in self.hops if s.reader), return_exceptions=True)


def _resolve(future: asyncio.Future | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)
