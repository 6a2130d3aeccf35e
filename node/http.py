"""The node's plain-HTTP routes: `GET /info` and the stateless `POST /forward`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from node.accept import read_body
from node.limits import source_key
from node.state import STATE, NodeState
from swarm import wire
from swarm.errors import (
    BadRequest,
    BadSpan,
    Busy,
    FrameTooLarge,
    ModelMismatch,
    NotPermitted,
    SessionNotFound,
    ShuttingDown,
    SignatureInvalid,
    SwarmError,
)
from swarm.seal import FORWARD_SESSION, Transcript, seal_payload, tensor_digest

# HTTP status for each error class on the plain-HTTP routes (most specific first)
_HTTP_STATUS = (
    (FrameTooLarge, 413),
    (SignatureInvalid, 403),
    (NotPermitted, 403),
    (ModelMismatch, 409),
    (SessionNotFound, 404),
    (Busy, 503),
    (ShuttingDown, 503),
    (BadRequest, 400),
    (BadSpan, 400),
)


async def get_info(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].info())


async def post_forward(request: web.Request) -> web.Response:
    """Stateless forward of hidden states through a sub-span (prefill-only work, verification).

    Its tokens are capped by `max_forward_tokens` (by default the session length: a client's
    failover splice sends a whole prefix here); its scratch cache is a session while it lives
    (node/backend.py), and beyond the per-source and node-wide counts it is answered `busy`.
    The body is read in time (node/accept.py), after the cheap refusals."""
    state = request.app[STATE]
    try:
        if request.content_length is None or request.content_length > state.config.max_frame:
            raise FrameTooLarge(f"body must have a Content-Length of at most {state.config.max_frame} bytes")
        if state.phase.leaving:
            raise ShuttingDown("node is shutting down")
        backend = state.backend
        if backend is None:
            state.span  # noqa: B018 - raises BadSpan: a bootstrap peer computes nothing
        # Per source first: one stranger's forwards must not take all of the node's `max_forwards`;
        # and a refusal comes before the body is read, let alone decoded.
        with state.forward_sources.acquire(source_key(request.remote)):
            backend.check_forward_room()
            message = wire.decode(await read_body(request, state.config.body_timeout_s, state.config.max_frame), state.config.max_frame)
            if message["type"] != "forward":
                raise BadRequest(f"POST /forward takes a 'forward' message, not {message['type']!r}")
            check_model(state, message)
            blocks = wire.block_range(message)
            backend.check_blocks(blocks)
            hidden = wire.unpack_tensor(message.get("hidden"), hidden_size=backend.span.config.hidden_size, max_tokens=backend.max_forward_tokens)
            out = await backend.forward(blocks, hidden)
        dtype = message["hidden"]["dtype"]
        packed = wire.pack_tensor(out, dtype)
        seal = forward_seal(state, blocks, message["hidden"], packed)
        body = wire.encode({"type": "result", "blocks": list(blocks), "hidden": packed, "seal": seal, "peer_id": state.identity.peer_id})
        state.metrics.forward(ok=True)
        return web.Response(body=body, content_type="application/msgpack")
    except SwarmError as exc:
        state.metrics.forward(ok=False)
        return error_response(exc)


def forward_seal(state: NodeState, blocks: tuple[int, int], given: dict[str, Any], sent: dict[str, Any]) -> bytes:
    """This node's seal over a one-step transcript of a forward (session "forward", step 0, position 0):
    an answer it can be held to, like any session step's."""
    transcript = Transcript(state.fingerprint.digest, blocks, FORWARD_SESSION, state.identity.peer_id)
    digest = transcript.update(0, 0, tensor_digest(given["dtype"], given["shape"], given["data"]), tensor_digest(sent["dtype"], sent["shape"], sent["data"]))
    return state.identity.sign(seal_payload(digest))


def error_response(exc: SwarmError) -> web.Response:
    status = next((code for cls, code in _HTTP_STATUS if isinstance(exc, cls)), 500)
    return web.Response(status=status, body=wire.encode(wire.error_message(exc)), content_type="application/msgpack")


def check_model(state: NodeState, message: dict[str, Any]) -> None:
    state.span  # noqa: B018 - raises BadSpan on a node that holds no blocks (and has no model)
    model = wire.field(message, "model", str)
    if model != state.fingerprint.digest:
        raise ModelMismatch(f"this node serves model {state.fingerprint} (digest {state.fingerprint.digest}), not {model}")
