"""The `/session` websocket: open, step, retarget and close inference sessions.

Every frame is checked at the edge (`swarm.wire`) and every refusal is a typed
error frame, sent to the session's owner when the session is known and to the
sender otherwise. A bad frame never ends the connection, let alone the node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from node.channel import Channel
from node.http import check_model
from node.sessions import NextHop, Session
from node.state import STATE, NodeState, Phase
from swarm import wire
from swarm.errors import BadRequest, Busy, LengthExceeded, PeerUnavailable, SessionNotFound, ShuttingDown, SwarmError

log = logging.getLogger(__name__)



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
            close_session(state, session)  # the owner is gone: free its caches
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
    if state.phase.leaving:
        raise ShuttingDown("node is shutting down: open the session elsewhere")
    if state.phase is Phase.MOVING:
        raise Busy("node is moving to other blocks: open the session elsewhere")
    session_id = wire.session_id(message)
    check_model(state, message)
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
    if state.phase is Phase.CLOSING and channel is session.owner:
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
    close_session(state, session)
    await channel.send({"type": "closed", "session": session.id})


def close_session(state: NodeState, session: Session) -> None:
    if state.sessions.find(session.id) is session:
        state.sessions.pop(session.id)
    state.backend.free_cache(session.cache)


_HANDLERS: dict[str, _Handler] = {"open": _on_open, "step": _on_step, "retarget": _on_retarget, "close": _on_close}


async def reap_idle(state: NodeState) -> None:
    """Free the caches of sessions nobody has stepped for `session_timeout_s`."""
    period = max(0.05, min(10.0, state.config.session_timeout_s / 4))
    while True:
        await asyncio.sleep(period)
        for session in state.sessions.idle(state.config.session_timeout_s):
            close_session(state, session)
            await session.owner.send(
                wire.error_message(SessionNotFound(f"session {session.id} expired after {state.config.session_timeout_s:g} s idle"), session=session.id)
            )
