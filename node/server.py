"""The node's aiohttp server: `GET /info`, `POST /forward` and the `/session` websocket.

Every frame is checked at the edge (`swarm.wire`) and every refusal is a typed
error frame, sent to the session's owner when the session is known and to the
sender otherwise. A bad frame never ends the connection, let alone the node.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from node.backend import Backend, BackendConfig
from node.balance import block_throughput, should_move
from node.channel import Channel
from node.discovery import DiscoveryConfig, NodeDiscovery
from node.push import PushPool
from node.sessions import NextHop, Session, Sessions
from swarm import wire
from swarm.errors import (
    BadRequest,
    BadSpan,
    Busy,
    FrameTooLarge,
    LengthExceeded,
    ModelMismatch,
    PeerUnavailable,
    SessionNotFound,
    ShuttingDown,
    SwarmError,
)
from swarm.discovery.gossip import peers_routes
from swarm.discovery.mdns import Advert
from swarm.identity import Identity
from swarm.model import ModelFingerprint, Span
from swarm.peers import PeerRecord, PeerTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 0
    public_url: str | None = None  # what peers dial; default http://host:port
    max_frame: int = wire.DEFAULT_MAX_FRAME
    session_timeout_s: float = 300.0  # an idle session's cache is freed after this
    drain_timeout_s: float = 10.0  # SIGTERM: how long sessions are still served while their clients move them
    shutdown_grace_s: float = 30.0  # how long SIGTERM then waits for steps in flight
    backend: BackendConfig = field(default_factory=BackendConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    rebalance: RebalanceConfig | None = None  # None: the span given at start is kept


@dataclass(frozen=True)
class RebalanceConfig:
    """`--blocks auto`: move to where the swarm is weakest, at most every `dwell_s`."""

    period_s: float = 30.0  # how often coverage is checked
    dwell_s: float = 120.0  # no move sooner than this after starting or the last move
    margin: float = 0.2  # a move must raise the bottleneck by more than this (relative)


@dataclass
class NodeState:
    """Everything the handlers share; built once by `serve`, owned by the app."""

    config: NodeConfig
    identity: Identity
    fingerprint: ModelFingerprint | None  # None with the backend: a bootstrap peer that holds no blocks
    backend: Backend | None
    push: PushPool
    url: str = ""
    table: PeerTable = field(default_factory=PeerTable)
    discovery: NodeDiscovery | None = None
    sessions: Sessions = field(default_factory=Sessions)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    tasks: set[asyncio.Task] = field(default_factory=set)  # service tasks (reaper, discovery)
    step_tasks: set[asyncio.Task] = field(default_factory=set)  # steps computing or being delivered
    shutting_down: bool = False  # SIGTERM: new sessions and forwards are refused, open sessions still step
    closing: bool = False  # then, past the drain: steps from clients are refused too
    moving: bool = False  # between spans: new sessions are refused as busy
    moves: int = 0
    sessions_opened: int = 0  # since start: lets an operator (and the failover test) see re-opens
    started: float = field(default_factory=time.time)

    @property
    def span(self) -> Span:
        """The blocks served; `BadSpan` on a bootstrap peer, which serves none."""
        if self.backend is None:
            raise BadSpan("this node serves no blocks (it is a bootstrap peer)")
        return self.backend.span

    def spawn(self, coro: Awaitable[Any], name: str, step: bool = False) -> None:
        owner = self.step_tasks if step else self.tasks
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        owner.add(task)
        task.add_done_callback(owner.discard)

    def record(self, leaving: bool = False) -> PeerRecord:
        """This node's signed record, fresh; `leaving` makes the tombstone a graceful exit publishes."""
        backend, ttl = self.backend, self.config.discovery.gossip.record_ttl_s
        common = dict(addresses=(self.url,), now=time.time(), ttl=ttl, leaving=leaving)
        if backend is None:
            return PeerRecord.create(self.identity, **common)
        span = backend.span
        return PeerRecord.create(
            self.identity,
            **common,
            model=self.fingerprint.to_dict(),
            num_layers=span.config.num_layers,
            span=(span.start, span.end),
            throughput=backend.throughput,
            load=min(1.0, backend.load),
            free_kv_bytes=max(0, backend.kv_free),
        )

    def advert(self, port: int) -> Advert:
        backend = self.backend
        span = (backend.span.start, backend.span.end) if backend else None
        return Advert(self.identity.peer_id, port, model=str(self.fingerprint or ""), span=span)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "peer_id": self.identity.peer_id,
            "public_key": self.identity.public_key_bytes.hex(),
            "url": self.url,
            "protocol": wire.PROTOCOL_VERSION,
            "peers": len(self.table),
            "shutting_down": self.shutting_down,
            "moving": self.moving,
            "moves": self.moves,
            "uptime_s": time.time() - self.started,
            "record": base64.b64encode(self.record().to_bytes()).decode(),
            "model": None,
            "span": None,
        }
        backend = self.backend
        if backend is None:
            return info
        span = backend.span
        return {
            **info,
            "model": self.fingerprint.to_dict(),
            "model_id": str(self.fingerprint),
            "num_layers": span.config.num_layers,
            "hidden_size": span.config.hidden_size,
            "span": [span.start, span.end],
            "dtype": str(span.dtype).removeprefix("torch."),
            "device": str(span.device),
            "throughput": backend.throughput,
            "load": backend.load,
            "sessions": backend.sessions,
            "sessions_opened": self.sessions_opened,
            "max_sessions": backend.config.max_sessions,
            "max_length": backend.max_length,
            "kv_free_bytes": backend.kv_free,
            "kv_total_bytes": backend.config.kv_memory_bytes,
            "steps": backend.steps_done,
            "batches": backend.batches_done,
        }


STATE = web.AppKey("state", NodeState)

# HTTP status for each error class on the plain-HTTP routes (most specific first)
_HTTP_STATUS = (
    (FrameTooLarge, 413),
    (ModelMismatch, 409),
    (SessionNotFound, 404),
    (Busy, 503),
    (ShuttingDown, 503),
    (BadRequest, 400),
    (BadSpan, 400),
)


# --- plain HTTP ---------------------------------------------------------------------------


async def get_info(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].info())


async def post_forward(request: web.Request) -> web.Response:
    """Stateless forward of hidden states through a sub-span (prefill-only work, verification)."""
    state = request.app[STATE]
    try:
        if request.content_length is None or request.content_length > state.config.max_frame:
            raise FrameTooLarge(f"body must have a Content-Length of at most {state.config.max_frame} bytes")
        if state.shutting_down:
            raise ShuttingDown("node is shutting down")
        message = wire.decode(await request.read(), state.config.max_frame)
        if message["type"] != "forward":
            raise BadRequest(f"POST /forward takes a 'forward' message, not {message['type']!r}")
        span = state.span
        _check_model(state, message)
        blocks = wire.block_range(message)
        state.backend.check_blocks(blocks)
        hidden = wire.unpack_tensor(message.get("hidden"), hidden_size=span.config.hidden_size, max_tokens=state.backend.max_length)
        out = await state.backend.forward(blocks, hidden)
        dtype = message["hidden"]["dtype"]
        body = wire.encode({"type": "result", "blocks": list(blocks), "hidden": wire.pack_tensor(out, dtype)})
        return web.Response(body=body, content_type="application/msgpack")
    except SwarmError as exc:
        status = next((code for cls, code in _HTTP_STATUS if isinstance(exc, cls)), 500)
        return web.Response(status=status, body=wire.encode(wire.error_message(exc)), content_type="application/msgpack")


def _check_model(state: NodeState, message: dict[str, Any]) -> None:
    state.span  # noqa: B018 - raises BadSpan on a node that holds no blocks (and has no model)
    model = wire.field(message, "model", str)
    if model != state.fingerprint.digest:
        raise ModelMismatch(f"this node serves model {state.fingerprint} (digest {state.fingerprint.digest}), not {model}")


# --- the session websocket ---------------------------------------------------------------


async def session_socket(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    # aiohttp drops a connection whose frame is over its own limit; ours, checked in
    # wire.decode, is half of it, so frames up to twice our limit get a typed error.
    ws = web.WebSocketResponse(max_msg_size=2 * state.config.max_frame, compress=False)
    await ws.prepare(request)
    channel = Channel(ws, f"{request.remote}")
    state.sockets.add(ws)
    try:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await _handle_frame(state, channel, msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await channel.send(wire.error_message(BadRequest("frames must be binary msgpack, not text")))
    finally:
        state.sockets.discard(ws)
        for session in state.sessions.owned_by(channel):
            _close_session(state, session)  # the owner is gone: free its caches
    return ws


_Handler = Callable[[NodeState, Channel, dict[str, Any]], Awaitable[None]]


async def _handle_frame(state: NodeState, channel: Channel, frame: bytes) -> None:
    message: dict[str, Any] = {}
    try:
        message = wire.decode(frame, state.config.max_frame)
        handler = _HANDLERS.get(message["type"])
        if handler is None:
            raise BadRequest(f"unknown message type {message['type']!r}")
        await handler(state, channel, message)
    except SwarmError as exc:
        context = {k: message[k] for k in ("session", "step") if isinstance(message.get(k), (str, int))}
        session = state.sessions.find(message.get("session"))
        # A bad pushed step concerns the session's owner, who can re-route; anything
        # else goes back to whoever sent it.
        target = session.owner if session is not None and message.get("type") == "step" else channel
        await target.send(wire.error_message(exc, **context))


async def _on_open(state: NodeState, channel: Channel, message: dict[str, Any]) -> None:
    if state.shutting_down:
        raise ShuttingDown("node is shutting down: open the session elsewhere")
    if state.moving:
        raise Busy("node is moving to other blocks: open the session elsewhere")
    session_id = wire.session_id(message)
    _check_model(state, message)
    blocks = wire.block_range(message)
    state.backend.check_blocks(blocks)
    max_length = wire.field(message, "max_length", int)
    dtype = message.get("dtype", "bfloat16")
    wire.wire_dtype(dtype)
    next_hop = _next_hop(message.get("next"))
    if state.sessions.find(session_id):
        raise BadRequest(f"session {session_id} is already open on this node")
    cache = state.backend.open_cache(blocks, max_length)
    state.sessions.add(Session(session_id, channel, blocks, max_length, dtype, next_hop, cache))
    state.sessions_opened += 1
    log.debug("opened session %s blocks %s max_length %d", session_id, blocks, max_length)
    await channel.send({"type": "opened", "session": session_id, "blocks": list(blocks), "max_length": max_length})


def _next_hop(raw: object) -> NextHop | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BadRequest("field 'next' must be a map of url and session")
    url = wire.field(raw, "url", str)
    if not url.startswith(("http://", "https://")) or len(url) > 256:
        raise BadRequest("next hop url must be an http(s) URL of at most 256 characters")
    return NextHop(url, wire.session_id(raw))


async def _on_step(state: NodeState, channel: Channel, message: dict[str, Any]) -> None:
    session = state.sessions.get(wire.session_id(message))
    if state.closing and channel is session.owner:
        # A new step from the client; steps pushed by a previous hop are in flight and still run.
        raise ShuttingDown("node is shutting down: move the session elsewhere")
    step = wire.non_negative_int(message, "step")
    if channel is not session.owner and step < session.newest_step:
        # A hop that failover replaced, finishing late: its output is stale, and running it would
        # rewind this cache behind steps that already ran.
        log.debug("dropped stale step %d pushed to session %s (newest %d)", step, session.id, session.newest_step)
        return
    session.newest_step = max(session.newest_step, step)
    position = wire.non_negative_int(message, "position")
    output = message.get("output", "all")
    if output not in ("all", "last"):
        raise BadRequest("field 'output' must be 'all' or 'last'")
    hidden = wire.unpack_tensor(message.get("hidden"), hidden_size=state.span.config.hidden_size, max_tokens=session.max_length)
    if position + hidden.shape[0] > session.max_length:
        raise LengthExceeded(f"step would reach position {position + hidden.shape[0]}, past max_length {session.max_length}")
    session.touch()
    done = state.backend.submit(session.cache, session.blocks, hidden, position)
    state.spawn(_finish_step(state, session, step, position, output, done, time.perf_counter()), f"step {session.id}:{step}", step=True)


async def _finish_step(state: NodeState, session: Session, step: int, position: int, output: str, done: asyncio.Future, began: float) -> None:
    context = {"session": session.id, "step": step}
    try:
        result = await done
    except SwarmError as exc:
        await session.owner.send(wire.error_message(exc, **context))
        return
    out = result.hidden
    # compute_ms: the model alone; queue_ms: from arrival to result (queueing and thread hops included)
    timing = {"compute_ms": result.compute_s * 1e3, "queue_ms": (time.perf_counter() - began) * 1e3, "batch": result.batch_size}
    if session.next_hop is None:
        hidden = out[-1:] if output == "last" else out
        await session.owner.send({"type": "result", **context, "blocks": list(session.blocks), **timing, "hidden": wire.pack_tensor(hidden, session.wire_dtype)})
        return
    forward = {"type": "step", "session": session.next_hop.session, "step": step, "position": position, "output": output, "hidden": wire.pack_tensor(out, session.wire_dtype)}
    try:
        await state.push.push(session.next_hop.url, forward)
    except PeerUnavailable as exc:
        await session.owner.send(wire.error_message(exc, **context, hop=session.next_hop.url))
        return
    await session.owner.send({"type": "ack", **context, "blocks": list(session.blocks), **timing})


async def _on_retarget(state: NodeState, channel: Channel, message: dict[str, Any]) -> None:
    """Push this session's later outputs somewhere else: failover splices a new sub-route in after us."""
    session = state.sessions.get(wire.session_id(message))
    if channel is not session.owner:
        raise BadRequest(f"only the owner of session {session.id} may retarget it")
    session.next_hop = _next_hop(message.get("next"))
    await channel.send({"type": "retargeted", "session": session.id})


async def _on_close(state: NodeState, channel: Channel, message: dict[str, Any]) -> None:
    session = state.sessions.get(wire.session_id(message))
    _close_session(state, session)
    await channel.send({"type": "closed", "session": session.id})


def _close_session(state: NodeState, session: Session) -> None:
    if state.sessions.find(session.id) is session:
        state.sessions.pop(session.id)
    state.backend.free_cache(session.cache)


_HANDLERS: dict[str, _Handler] = {"open": _on_open, "step": _on_step, "retarget": _on_retarget, "close": _on_close}


async def _reap_idle(state: NodeState) -> None:
    """Free the caches of sessions nobody has stepped for `session_timeout_s`."""
    period = max(0.05, min(10.0, state.config.session_timeout_s / 4))
    while True:
        await asyncio.sleep(period)
        for session in state.sessions.idle(state.config.session_timeout_s):
            _close_session(state, session)
            await session.owner.send(
                wire.error_message(SessionNotFound(f"session {session.id} expired after {state.config.session_timeout_s:g} s idle"), session=session.id)
            )


# --- lifecycle ----------------------------------------------------------------------------


def build_app(state: NodeState) -> web.Application:
    app = web.Application(client_max_size=state.config.max_frame)
    app[STATE] = state
    app.add_routes([web.get("/info", get_info), web.post("/forward", post_forward), web.get("/session", session_socket)])
    app.add_routes(peers_routes(state.table, max_frame=state.config.discovery.gossip.max_frame, identity=state.identity))
    return app


async def shutdown(state: NodeState) -> None:
    """Leave discovery, refuse new sessions, ask owners to move theirs (serving them meanwhile), finish
    steps in flight, then close what is left with `shutting_down`."""
    state.shutting_down = True
    if state.discovery is not None:
        await state.discovery.leave()  # first: clients stop routing here while sessions finish
    await _drain_sessions(state)
    state.closing = True
    try:
        if state.backend is not None:
            await asyncio.wait_for(state.backend.drain(), state.config.shutdown_grace_s)
        if state.step_tasks:
            await asyncio.wait(list(state.step_tasks), timeout=state.config.shutdown_grace_s)
    except asyncio.TimeoutError:
        log.warning("steps still running after %.0f s; closing anyway", state.config.shutdown_grace_s)
    for session in state.sessions:
        _close_session(state, session)
        await session.owner.send(wire.error_message(ShuttingDown("node is shutting down: move the session elsewhere"), session=session.id))
    for ws in list(state.sockets):  # a copy: handlers remove themselves as they end
        await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"node shutting down")


async def _drain_sessions(state: NodeState) -> None:
    """Tell every session's owner to move it, and wait (up to `drain_timeout_s`) until all have.

    The node serves them all the while, so a client splices the session onto
    another peer between two steps and no step fails (on SIGTERM and before a move)."""
    if not len(state.sessions):
        return
    for session in state.sessions:
        await session.owner.send({"type": "draining", "session": session.id})
    log.info("draining: waiting up to %.0f s for %d sessions to move elsewhere", state.config.drain_timeout_s, len(state.sessions))
    try:
        await asyncio.wait_for(state.sessions.emptied.wait(), state.config.drain_timeout_s)
    except asyncio.TimeoutError:
        log.info("draining: %d sessions did not move; closing them", len(state.sessions))


async def serve(
    span: Span | None,
    fingerprint: ModelFingerprint | None,
    identity: Identity,
    config: NodeConfig,
    ready: Callable[[NodeState], None] | None = None,
    stop: asyncio.Event | None = None,
    executor: concurrent.futures.Executor | None = None,
    loader: Callable[[int, int], Span] | None = None,
) -> None:
    """Run a node until `stop` is set (or SIGTERM/SIGINT, when this is the main thread), then shut
    down gracefully. `span` None: a bootstrap peer. `executor` runs the model (see node/compute.py)."""
    stop = stop or asyncio.Event()
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        push = PushPool(http, config.max_frame)
        stack.push_async_callback(push.close)
        state = NodeState(config, identity, fingerprint, None, push, table=PeerTable(config.discovery.table))
        stack.push_async_callback(_close_backend, state)  # whichever is current at the end: a move replaces it
        if span is not None:
            state.backend = Backend(span, config.backend, executor)
            await state.backend.__aenter__()
        backend = state.backend
        runner = web.AppRunner(build_app(state), handle_signals=False, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        stack.push_async_callback(_cancel_tasks, state)
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        state.url = config.public_url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        state.discovery = await stack.enter_async_context(
            NodeDiscovery(config.discovery, state.table, state.record, state.advert(port))
        )
        state.spawn(_reap_idle(state), "reaper")
        if config.rebalance is not None and loader is not None and backend is not None:
            state.spawn(_rebalance(state, config.rebalance, loader, executor), "rebalancer")
        if ready:
            ready(state)
        await stop.wait()
        log.info("shutting down")
        await shutdown(state)


async def _rebalance(state: NodeState, config: RebalanceConfig, loader, executor) -> None:
    """Every period (after the dwell), move to a better span if the swarm's coverage calls for it."""
    last_move = time.monotonic()
    while True:
        await asyncio.sleep(config.period_s * random.uniform(0.8, 1.2))  # jitter: nodes do not all move at once
        if state.shutting_down or time.monotonic() - last_move < config.dwell_s:
            continue
        span = state.span
        totals = block_throughput(state.table.records(time.time()), state.fingerprint.digest, span.config.num_layers)
        target = should_move(totals, (span.start, span.end), state.backend.throughput, margin=config.margin)
        if target is None:
            continue
        log.info("moving from blocks [%d, %d) to [%d, %d)", span.start, span.end, *target)
        await move(state, target, loader, executor)
        last_move = time.monotonic()


async def move(state: NodeState, target: tuple[int, int], loader, executor) -> None:
    """Serve `target` instead: sessions here are told to move (served until they have, as on
    SIGTERM; any left are closed with `shutting_down`), then the new blocks load."""
    state.moving = True
    try:
        await _drain_sessions(state)
        for session in state.sessions:
            _close_session(state, session)
            await session.owner.send(wire.error_message(ShuttingDown("node is moving to other blocks: move the session elsewhere"), session=session.id))
        old = state.backend
        await old.drain()
        span = await asyncio.get_running_loop().run_in_executor(executor, loader, *target)  # on the compute thread
        new = Backend(span, state.config.backend, executor)
        await new.__aenter__()
        state.backend = new
        await old.__aexit__(None, None, None)  # its weights go with it
        state.moves += 1
    finally:
        state.moving = False


async def _close_backend(state: NodeState) -> None:
    if state.backend is not None:
        await state.backend.__aexit__(None, None, None)


async def _cancel_tasks(state: NodeState) -> None:
    tasks = state.tasks | state.step_tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
