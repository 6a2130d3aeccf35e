"""The `/session` websocket: open, step, retarget and close inference sessions; prove this node's key.

Every frame is decoded and checked whole (`swarm.protocol`) before it changes
anything, and every refusal is a typed error frame sent back to whoever sent
the frame: a stranger's bad frame never reaches a session's owner. A session is
a capability: only its owner's connection may close or retarget it, and a step
from any other connection (the previous hop's push) must carry the session's
secret push token. A bad frame never ends the connection, let alone the node.

Per source address (node/limits.py): at most `max_sockets_per_source` open
websockets and `max_sessions_per_source` open sessions, each answered with a
typed `busy`. A websocket that sends nothing for `socket_idle_timeout_s` and
owns no session is closed; a session never stepped within
`unstepped_session_grace_s` of its open is freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import aiohttp
import torch
from aiohttp import web

from node.channel import Channel
from node.head_service import check_head_request, check_head_step, with_head
from node.limits import source_key
from node.push import check_next_hop
from node.sessions import Session
from node.state import STATE, NodeState, Phase
from swarm import wire
from swarm.addresses import check_dialable
from swarm.errors import (
    BadRequest,
    Busy,
    Convicted,
    HopNotProven,
    IdentityMismatch,
    LengthExceeded,
    ModelMismatch,
    NotMember,
    NotPermitted,
    PeerUnavailable,
    SessionNotFound,
    ShuttingDown,
    SwarmError,
)
from swarm.protocol import (
    Ack,
    Close,
    Closed,
    Error,
    Limits,
    NextHop,
    Open,
    Opened,
    Proof,
    Prove,
    Result,
    Retarget,
    Retargeted,
    Step,
    check_session_id,
    opened_payload,
    proof_payload,
)
from swarm.seal import Transcript, digest_of, seal_payload

log = logging.getLogger(__name__)

BUSY_CLOSE = aiohttp.WSCloseCode.TRY_AGAIN_LATER  # 1013: over a per-source connection limit
IDLE_CLOSE = aiohttp.WSCloseCode.GOING_AWAY  # 1001: idle, owning no session


async def session_socket(request: web.Request) -> web.WebSocketResponse:
    state = request.app[STATE]
    source = source_key(request.remote)
    # aiohttp cuts a frame over max_msg_size while reading it (close code 1009), so an
    # oversized frame is never held whole; wire.decode checks the same limit again.
    ws = web.WebSocketResponse(max_msg_size=state.config.max_frame, compress=False)
    try:
        held = state.socket_limit.acquire(source)
    except Busy as exc:
        state.metrics.refused(exc.code)
        await ws.prepare(request)
        await ws.send_bytes(wire.encode(Error.of(exc).to_wire()))
        await ws.close(code=BUSY_CLOSE, message=b"busy: too many connections from this source")
        return ws
    with held:
        await ws.prepare(request)
        channel = Channel(ws, source, source, on_error=state.metrics.refused)
        state.sockets.add(ws)
        state.channels.add(channel)
        try:
            async for msg in ws:
                channel.last_used = time.monotonic()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await _handle_frame(state, channel, msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    await channel.send(Error.of(BadRequest("frames must be binary msgpack, not text")))
        finally:
            state.sockets.discard(ws)
            state.channels.discard(channel)
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
            raise BadRequest(f"unknown message type {message['type'][:32]!r}")
        await handler(state, channel, message)
    except SwarmError as exc:
        # Whatever a frame caused goes back to its sender. (Errors of a step that passed its
        # checks, from the owner or pushed with the token, go to the owner: see _on_step.)
        await channel.send(Error.of(exc, session=_echo_session(message), step=_echo_step(message)))


def _echo_session(message: dict[str, Any]) -> str | None:
    try:
        return check_session_id(message.get("session"))
    except SwarmError:
        return None


def _echo_step(message: dict[str, Any]) -> int | None:
    step = message.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**53 else None


async def _on_open(state: NodeState, channel: Channel, message: dict[str, Any]) -> None:
    if state.phase.leaving:
        raise ShuttingDown("node is shutting down: open the session elsewhere")
    if state.phase is Phase.MOVING:
        raise Busy("node is moving to other blocks: open the session elsewhere")
    state.span  # noqa: B018 - raises BadSpan on a node that holds no blocks
    request = Open.from_wire(message)
    if request.model != state.fingerprint.digest:
        raise ModelMismatch(f"this node serves model {state.fingerprint} (digest {state.fingerprint.digest}), not {request.model}")
    state.backend.check_blocks(request.blocks)
    if request.head:
        check_head_request(state.head, request.blocks, state.span.end)
    if state.sessions.find(request.session):
        raise BadRequest(f"session {request.session} is already open on this node")
    _admit_next(state, request.blocks, request.next)
    hold = state.session_limit.acquire(channel.source)
    try:
        cache = state.backend.open_cache(request.blocks, request.max_length)
    except BaseException:
        hold.release()
        raise
    identity = state.identity
    transcript = Transcript(request.model, request.blocks, request.session, identity.peer_id)
    session = Session(request.session, channel, request.blocks, request.max_length, request.dtype, request.next, cache, request.token, transcript, request.tap, hold, head=request.head)
    state.sessions.add(session)
    state.sessions_opened += 1
    log.debug("opened session %s blocks %s max_length %d", request.session, request.blocks, request.max_length)
    signature = identity.sign(opened_payload(request.nonce, request.session, request.blocks))
    await channel.send(Opened(request.session, request.blocks, request.max_length, identity.peer_id, identity.public_key_bytes, signature, state.record()))


def _admit_next(state: NodeState, blocks: tuple[int, int], next_hop: NextHop | None) -> None:
    """Refuse a next hop that is not a known or recorded peer serving the next block (`BadAddress`), or
    whose address this node does not dial for strangers (`AddressRefused`: see swarm/addresses.py)."""
    if next_hop is not None:
        if state.court.is_convicted(next_hop.peer_id, time.time()):
            raise Convicted(f"next hop {next_hop.peer_id} was convicted of sending wrong outputs: route around it")
        check_next_hop(next_hop, blocks[1], state.fingerprint.digest, state.span.config.num_layers, state.table, time.time())
        if state.discovery is not None and state.discovery.policy is not None:
            check_dialable(next_hop.url, state.discovery.policy)


async def _on_step(state: NodeState, channel: Channel, message: dict[str, Any]) -> None:
    backend = state.backend
    if backend is None:
        raise SessionNotFound("this node serves no blocks and holds no sessions")
    request = Step.from_wire(message, Limits(hidden_size=state.span.config.hidden_size, max_tokens=backend.max_length))
    session = state.sessions.get(request.session)
    pushed = channel is not session.owner
    if pushed and not session.may_push(request.token):
        raise NotPermitted(f"a step for session {session.id} from anyone but its owner must carry its push token")
    # From here the step is the session's own (its owner's, or pushed with its token): its errors
    # concern the owner, who can re-route.
    try:
        if not pushed and state.phase is Phase.CLOSING:
            # A new step from the client; steps pushed by a previous hop are in flight and still run.
            raise ShuttingDown("node is shutting down: move the session elsewhere")
        if pushed and request.step < session.newest_step:
            # A hop that failover replaced, finishing late: its output is stale, and running it would
            # rewind this cache behind steps that already ran.
            log.debug("dropped stale step %d pushed to session %s (newest %d)", request.step, session.id, session.newest_step)
            return
        end = request.position + request.hidden.shape[0]
        if end > session.max_length:
            raise LengthExceeded(f"step would reach position {end}, past max_length {session.max_length}")
        check_head_step(session.head, request.output, request.hidden.shape[0])  # before it computes
    except SwarmError as exc:
        await session.owner.send(Error.of(exc, session=session.id, step=request.step))
        return
    session.newest_step = max(session.newest_step, request.step)  # only now: the frame is valid whole
    session.touch()
    done = backend.submit(session.cache, session.blocks, request.hidden, request.position)
    state.spawn(_finish_step(state, session, request, done, time.perf_counter()), f"step {session.id}:{request.step}", step=True)


async def _finish_step(state: NodeState, session: Session, request: Step, done: asyncio.Future, began: float) -> None:
    try:
        result = await done
    except SwarmError as exc:
        await session.owner.send(Error.of(exc, session=session.id, step=request.step))
        return
    # compute_ms: the model alone; queue_ms: from arrival to result (queueing and thread hops included)
    compute_ms, queue_ms = result.compute_s * 1e3, (time.perf_counter() - began) * 1e3
    next_hop = session.next_hop
    out = result.hidden if next_hop is not None or request.output == "all" else result.hidden[-1:]
    # Converted once: the push, the digest and a tapped ack all send these very bytes.
    sent = out.to(dtype=wire.WIRE_DTYPES[session.wire_dtype]).contiguous()
    # Chained now, before any await: a session's steps finish in order here, so the chain follows them.
    digest = seal_step(session.transcript, request, sent, session.wire_dtype)
    if next_hop is None:
        seal = state.identity.sign(seal_payload(digest))
        answer = Result(session.id, request.step, session.blocks, compute_ms, queue_ms, result.batch_size, seal, sent, session.wire_dtype)
        await session.owner.send(answer if not session.head else await with_head(state.head, answer, session.head))
        return
    forward = Step(next_hop.session, request.step, request.position, sent, session.wire_dtype, request.output, next_hop.token)
    try:
        if state.court.is_convicted(next_hop.peer_id, time.time()):  # convicted since the session opened
            raise Convicted(f"next hop {next_hop.peer_id} was convicted of sending wrong outputs: route around it")
        await state.push.push(next_hop, forward)
    except (PeerUnavailable, HopNotProven, Convicted, IdentityMismatch, NotMember) as exc:  # NotMember: a next hop outside our swarm
        await session.owner.send(Error.of(exc, session=session.id, step=request.step, hop=next_hop.peer_id))
        return
    seal = state.identity.sign(seal_payload(digest))  # after the push: the next hop need not wait for it
    tapped = (sent, session.wire_dtype) if session.tap else (None, None)
    await session.owner.send(Ack(session.id, request.step, session.blocks, compute_ms, queue_ms, result.batch_size, seal, *tapped))


def seal_step(transcript: Transcript, request: Step, sent: torch.Tensor, dtype: str) -> bytes:
    """Chain one step into the session's transcript: its input as received, its output as sent."""
    return transcript.update(request.step, request.position, digest_of(request.hidden, request.dtype), digest_of(sent, dtype))


async def _on_retarget(state: NodeState, channel: Channel, message: dict[str, Any]) -> None:
    """Push this session's later outputs somewhere else: failover splices a new sub-route in after us."""
    request = Retarget.from_wire(message)
    session = state.sessions.get(request.session)
    if channel is not session.owner:
        raise NotPermitted(f"only the owner of session {session.id} may retarget it")
    _admit_next(state, session.blocks, request.next)
    session.next_hop = request.next
    await channel.send(Retargeted(session.id))


async def _on_close(state: NodeState, channel: Channel, message: dict[str, Any]) -> None:
    request = Close.from_wire(message)
    session = state.sessions.get(request.session)
    if channel is not session.owner:
        raise NotPermitted(f"only the owner of session {session.id} may close it")
    close_session(state, session)
    await channel.send(Closed(session.id))


async def _on_prove(state: NodeState, channel: Channel, message: dict[str, Any]) -> None:
    """A node about to push to us asks us to sign its nonce: once per connection (a signature costs CPU)."""
    request = Prove.from_wire(message)
    if channel.proved:
        raise NotPermitted("this connection already had its proof")
    channel.proved = True
    identity = state.identity
    await channel.send(Proof(identity.peer_id, identity.public_key_bytes, identity.sign(proof_payload(request.nonce))))


def close_session(state: NodeState, session: Session) -> None:
    if state.sessions.find(session.id) is session:
        state.sessions.pop(session.id)
    if session.hold is not None:
        session.hold.release()
    state.backend.free_cache(session.cache)


_HANDLERS: dict[str, _Handler] = {"open": _on_open, "step": _on_step, "retarget": _on_retarget, "close": _on_close, "prove": _on_prove}


async def reap_idle(state: NodeState) -> None:
    """Free sessions idle for `session_timeout_s` or never stepped within the grace, and close
    websockets idle for `socket_idle_timeout_s` that own no session."""
    config = state.config
    period = max(0.05, min(10.0, config.session_timeout_s / 4, config.unstepped_session_grace_s / 4, config.socket_idle_timeout_s / 4))
    while True:
        await asyncio.sleep(period)
        for session, why in state.sessions.expired(config.session_timeout_s, config.unstepped_session_grace_s):
            close_session(state, session)
            await session.owner.send(Error.of(SessionNotFound(f"session {session.id} {why}"), session=session.id))
        cutoff = time.monotonic() - config.socket_idle_timeout_s
        for channel in list(state.channels):
            if channel.last_used < cutoff and not channel.closed and not state.sessions.owned_by(channel):
                await channel.ws.close(code=IDLE_CLOSE, message=b"idle")
