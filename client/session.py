"""An inference session across a route of nodes.

The client opens a session on every hop, each told to push its output to the
next hop's session; a step goes to the first hop and the result comes back from
the last. Every hop acknowledges each step to the client, so the client sees at
once which hop failed. Everything opened is closed on exit, also on errors and
cancellation.

`replace` swaps one failed hop for a new sub-route over the same blocks while
every other hop keeps its session and KV cache: the prefix is run statelessly
(POST /forward) through the hops before the gap to get the gap's inputs, the new
hops prefill from them, then the hop before the gap is retargeted to push into
the new sub-route and the new sub-route's last hop to push to the hop after it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
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
    retired: bool = False  # replaced by failover: its connection closing is expected
    draining: bool = False  # its node is shutting down and asked for the session to move


@dataclass
class _Pending:
    step: int
    done: asyncio.Future = field(repr=False)


class RouteSession:
    """`async with RouteSession(http, hops, model_digest, max_length) as s: hidden = await s.forward(x, 0)`."""

    def __init__(self, http: aiohttp.ClientSession, hops: Sequence[RemoteHop], model: str, max_length: int, config: SessionConfig | None = None) -> None:
        if not hops:
            raise BadRequest("a route needs at least one hop")
        _check_contiguous(hops, "route")
        self.http = http
        self.model = model
        self.max_length = max_length
        self.config = config or SessionConfig()
        self.hops = [_HopState(h, secrets.token_urlsafe(12)) for h in hops]
        self._step = 0
        self._pending: dict[int, _Pending] = {}
        self._replies: dict[str, asyncio.Future] = {}  # session id -> its awaited "opened"/"retargeted"
        self._retiring: list[asyncio.Future] = []  # replaced hops, closing in the background
        self.broken: SwarmError | None = None  # set once a hop fails the whole session

    @property
    def route(self) -> list[RemoteHop]:
        return [h.hop for h in self.hops]

    def take_draining(self) -> list[RemoteHop]:
        """Hops whose node said it is shutting down since the last call: they still serve, but
        each should be `replace`d before its node goes."""
        draining = [h for h in self.hops if h.draining]
        for state in draining:
            state.draining = False
        return [h.hop for h in draining]

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
        await self._connect(self.hops)
        await self._open(self.hops, None)

    async def _connect(self, states: Sequence[_HopState]) -> None:
        for state in states:
            try:
                state.ws = await self.http.ws_connect(
                    f"{state.hop.url.rstrip('/')}/session",
                    max_msg_size=2 * self.config.max_frame,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=self.config.close_timeout_s),
                )
            except (aiohttp.ClientError, OSError) as exc:
                raise at_hop(PeerUnavailable(f"cannot reach {state.hop} at {state.hop.url}: {exc}"), state.hop) from None
            state.reader = asyncio.create_task(self._read(state), name=f"session-reader {state.hop}")

    async def _open(self, states: Sequence[_HopState], after: _HopState | None) -> None:
        """Open `states` (a chain) from the last backwards, so every push target exists before it is used."""
        for index in reversed(range(len(states))):
            state = states[index]
            target = states[index + 1] if index + 1 < len(states) else after
            message = {
                "type": "open",
                "session": state.session_id,
                "blocks": [state.hop.start, state.hop.end],
                "max_length": self.max_length,
                "dtype": self.config.wire_dtype,
                "model": self.model,
                "next": _address(target),
            }
            await self._request(state, message)

    async def _request(self, state: _HopState, message: dict[str, Any]) -> None:
        """Send a control message to one hop and wait for its reply ("opened", "retargeted")."""
        reply = self._replies[state.session_id] = asyncio.get_running_loop().create_future()
        try:
            await self._send(state, message)
            await reply
        finally:
            self._replies.pop(state.session_id, None)

    async def _send(self, state: _HopState, message: dict[str, Any]) -> None:
        # A connection can be closing before its reader has noticed; the write then raises.
        try:
            if state.ws is None or state.ws.closed:
                raise ConnectionResetError("closed")
            await state.ws.send_bytes(wire.encode(message))
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise at_hop(PeerUnavailable(f"connection to {state.hop} is closed ({exc})"), state.hop) from None

    async def forward(self, hidden: torch.Tensor, start: int, output: str = "last", timeout: float | None = None) -> torch.Tensor:
        """Run hidden [T, D] at position `start` through every hop; returns [1, D] ("last") or [T, D].

        A step not answered within `timeout` (default `step_timeout_s`) fails with
        `PeerUnavailable` naming the first hop that has not acknowledged it.
        """
        if self.broken is not None:
            raise self.broken
        return await self._run(self.hops, hidden, start, output, timeout or self.config.step_timeout_s)

    async def _run(self, chain: Sequence[_HopState], hidden: torch.Tensor, start: int, output: str, timeout: float) -> torch.Tensor:
        """One step sent to `chain[0]`, answered by the chain's last hop."""
        step = self._step
        self._step += 1
        done = asyncio.get_running_loop().create_future()
        self._pending[step] = _Pending(step, done)
        first = chain[0]
        message = {"type": "step", "session": first.session_id, "step": step, "position": start, "output": output, "hidden": wire.pack_tensor(hidden, self.config.wire_dtype)}
        try:
            await self._send(first, message)
            return await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            laggard = next((s.hop for s in chain if s.acked < step), chain[-1].hop)
            raise at_hop(PeerUnavailable(f"step {step} timed out after {timeout:g} s waiting for {laggard}"), laggard) from None
        finally:
            self._pending.pop(step, None)

    async def replace(self, failed: RemoteHop, hops: Sequence[RemoteHop], prefix: torch.Tensor) -> None:
        """Put `hops` (covering exactly `failed`'s blocks) in place of `failed`; other hops keep their caches.

        `prefix` holds the route's inputs (block 0) for every position already
        computed; the new hops' caches are rebuilt from it. Errors are
        `TransientError`s naming the hop that failed. When it is one of `hops`,
        `failed` is still in the route and `replace` may be called again with
        other hops; when it is a hop the session meant to keep, the session is
        beyond repair and should be closed.
        """
        index = self.route.index(failed)
        if not hops or hops[0].start != failed.start or hops[-1].end != failed.end:
            raise BadRequest(f"a replacement for {failed} must cover blocks [{failed.start}, {failed.end})")
        _check_contiguous(hops, "replacement")
        old = self.hops[index]
        if not old.retired:
            old.retired = True  # its connection closing is no longer news
            self._retiring.append(asyncio.ensure_future(self._close_hop(old)))  # a dead hop may take a while
        before = self.hops[index - 1] if index > 0 else None
        after = self.hops[index + 1] if index + 1 < len(self.hops) else None
        fresh = [_HopState(h, secrets.token_urlsafe(12)) for h in hops]
        times = [time.perf_counter()]
        try:
            boundary = prefix
            for state in self.hops[:index]:  # the gap's inputs: the prefix through the hops before it
                boundary = await self._forward_once(state.hop, boundary)
            times.append(time.perf_counter())
            await self._connect(fresh)
            await self._open(fresh, None)
            times.append(time.perf_counter())
            if boundary.shape[0]:
                await self._run(fresh, boundary, 0, "last", self.config.step_timeout_s)
            times.append(time.perf_counter())
            if after is not None:
                await self._request(fresh[-1], {"type": "retarget", "session": fresh[-1].session_id, "next": _address(after)})
        except BaseException:
            for state in fresh:
                state.retired = True
            self._retiring.append(asyncio.ensure_future(asyncio.gather(*(self._close_hop(s) for s in fresh))))
            raise
        self.hops[index : index + 1] = fresh
        if before is not None:  # last: until now `before` pushed to the old hop, or nowhere
            await self._request(before, {"type": "retarget", "session": before.session_id, "next": _address(fresh[0])})
        times.append(time.perf_counter())
        if self.broken is not None and self.broken.hop not in self.route:
            self.broken = None  # it was about a hop that is gone now
        phases = " ".join(f"{name} {1e3 * (b - a):.0f} ms" for name, a, b in zip(("boundary", "open", "prefill", "retarget"), times, times[1:]))
        log.info("replaced %s with %s for %d positions: %s", failed, " -> ".join(map(str, hops)), prefix.shape[0], phases)

    async def _forward_once(self, hop: RemoteHop, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states through `hop`'s blocks without touching any session (POST /forward)."""
        body = wire.encode({"type": "forward", "model": self.model, "blocks": [hop.start, hop.end], "hidden": wire.pack_tensor(hidden, self.config.wire_dtype)})
        try:
            async with self.http.post(
                f"{hop.url.rstrip('/')}/forward", data=body, headers={"Content-Type": "application/msgpack"}, timeout=aiohttp.ClientTimeout(total=self.config.step_timeout_s)
            ) as response:
                message = wire.decode(await response.read(), self.config.max_frame)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise at_hop(PeerUnavailable(f"cannot forward through {hop}: {exc or type(exc).__name__}"), hop) from None
        if message.get("type") == "error":
            raise at_hop(error_from_code(str(message.get("code")), f"{hop}: {message.get('message')}"), hop)
        return wire.unpack_tensor(message.get("hidden"), hidden_size=hidden.shape[1], max_tokens=hidden.shape[0])

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
            if not state.retired and (state.ws.close_code is not None or state.ws.closed):
                self._fail_all(at_hop(PeerUnavailable(f"{state.hop} closed the connection"), state.hop))

    def _dispatch(self, state: _HopState, message: dict[str, Any]) -> None:
        if state.retired:
            return
        kind = message["type"]
        step = message.get("step")
        if kind in ("opened", "retargeted"):
            _resolve(self._replies.get(message.get("session")), None)
        elif kind == "draining":
            state.draining = True
        elif kind in ("ack", "result"):
            state.acked = max(state.acked, int(step))
            state.compute_ms = float(message.get("compute_ms", 0.0))
        if kind == "result":
            pending = self._pending.get(step)
            if pending:
                _resolve(pending.done, wire.unpack_tensor(message.get("hidden")))
        if kind == "error":
            error = error_from_code(str(message.get("code")), f"{state.hop}: {message.get('message')}")
            # the hop to route around: the reporter, or the next hop it could not push to
            at_hop(error, next((h.hop for h in self.hops if h.hop.url == message.get("hop")), state.hop))
            reply = self._replies.get(message.get("session"))
            if reply is not None and not reply.done():
                _fail(reply, error)
            elif isinstance(step, int):
                # A step's error fails that step. One no longer awaited is about a step failover
                # already replaced (a hop before the failed one finishing it late): nothing to do.
                _fail(self._pending[step].done if step in self._pending else None, error)
            else:
                self._fail_all(error)

    def _fail_all(self, error: SwarmError) -> None:
        if self.broken is None:
            self.broken = error
        for future in list(self._replies.values()) + [p.done for p in self._pending.values()]:
            _fail(future, error)

    async def close(self) -> None:
        """Close every hop's session and connection. Safe to call twice."""
        await asyncio.gather(*(self._close_hop(s) for s in self.hops), *self._retiring, return_exceptions=True)

    async def _close_hop(self, state: _HopState) -> None:
        ws = state.ws
        if ws is not None and not ws.closed:
            try:
                await ws.send_bytes(wire.encode({"type": "close", "session": state.session_id}))
                await ws.close()
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                pass
        if state.reader is not None:
            state.reader.cancel()
            await asyncio.gather(state.reader, return_exceptions=True)


def _check_contiguous(hops: Sequence[RemoteHop], what: str) -> None:
    for a, b in zip(hops, hops[1:]):
        if a.end != b.start:
            raise BadRequest(f"{what} is not contiguous: {a} then {b}")


def _address(state: _HopState | None) -> dict[str, str] | None:
    """Where a hop pushes its output: the next hop's session, or None to answer the client."""
    return {"url": state.hop.url, "session": state.session_id} if state is not None else None


def at_hop(error: SwarmError, hop: RemoteHop) -> SwarmError:
    error.hop = hop
    return error


def _resolve(future: asyncio.Future | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)
