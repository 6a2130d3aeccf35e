"""What a route session knows about each hop: the hop as planned (`RemoteHop`), the session's
settings, the per-hop state of an open session, and the helpers that mark an error with the
hop it came from (`at_hop`, `hop_of`). client/session.py re-exports the public names."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from swarm import wire
from swarm.errors import BadRequest, IdentityMismatch, SwarmError
from swarm.protocol import Message, NextHop
from swarm.records import PeerRecord, verify_record
from swarm.transport import PinMismatch


@dataclass(frozen=True)
class RemoteHop:
    """Blocks [start, end) served by the node at `url`."""

    url: str
    start: int
    end: int
    peer_id: str = ""  # the hop must prove this identity at open
    record: PeerRecord | None = field(default=None, compare=False, repr=False)  # its signed record, if discovery has it

    def __str__(self) -> str:
        return f"{self.peer_id[:8] or self.url}[{self.start}:{self.end})"


@dataclass(frozen=True)
class SessionConfig:
    wire_dtype: str = "bfloat16"
    max_frame: int = wire.DEFAULT_MAX_FRAME
    open_timeout_s: float = 30.0
    step_timeout_s: float = 60.0  # for one step through the whole route
    close_timeout_s: float = 1.0  # a hop that does not answer our close (cut off, dead) is dropped after this
    tap: bool = True  # every hop sends the client its outputs (so none can tell which generations are checked)
    # The LM head applied by a last hop that serves it (client/remote_head.py): "auto", "always" or "never",
    # how many candidates it answers, and the vocabulary (0: unknown, never asked; set by remote_head_config)
    remote_head: str = "auto"
    head_candidates: int = 64
    vocab_size: int = 0


@dataclass(eq=False)  # identity: hops are told apart by object, never by value
class HopState:
    hop: RemoteHop
    session_id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)  # its push token
    nonce: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)  # it signs this at open
    record: PeerRecord | None = field(default=None, repr=False)  # its signed record (from `opened` or discovery)
    public_key: bytes = field(default=b"", repr=False)  # the key it proved at open: its seals are checked against it
    seal: bytes = field(default=b"", repr=False)  # its seal over its transcript after the latest step it answered
    reply: asyncio.Future | None = field(default=None, repr=False)  # the answer awaited from it, if any
    expect: type[Message] | None = None  # ... and its type
    ws: aiohttp.ClientWebSocketResponse | None = None
    reader: asyncio.Task | None = None
    acked: int = -1  # last step this hop acknowledged
    compute_ms: float = 0.0  # model time of the last acknowledged step
    retired: bool = False  # replaced by failover: its connection closing is expected
    draining: bool = False  # its node is shutting down and asked for the session to move
    head: int = 0  # K: it applies the LM head and answers the top K (client/remote_head.py)


@dataclass
class Pending:
    step: int
    done: asyncio.Future = field(repr=False)
    chain: tuple[HopState, ...] = ()  # the hops this step runs through: acks from these, the result from the last
    rows: int = 1  # rows its result must hold: all the step's for output "all", else the last


def check_contiguous(hops: Sequence[RemoteHop], what: str) -> None:
    for a, b in zip(hops, hops[1:]):
        if a.end != b.start:
            raise BadRequest(f"{what} is not contiguous: {a} then {b}")


def next_hop_address(state: HopState | None) -> NextHop | None:
    """Where a hop pushes its output: the next hop's session, who it is and its token, or None to answer the client."""
    if state is None:
        return None
    return NextHop(state.hop.url.rstrip("/"), state.session_id, state.hop.peer_id, state.token, state.record)


def usable_record(record: PeerRecord, hop: RemoteHop) -> bool:
    """Whether a hop's own record may be passed on to the hop before it: valid now, its peer, its address."""
    try:
        verify_record(record, time.time())
    except SwarmError:
        return False
    return record.peer_id == hop.peer_id and hop.url.rstrip("/") in record.addresses


def identity_mismatch(hop: RemoteHop, exc: PinMismatch) -> IdentityMismatch:
    """What a pinned dial to `hop` that met another TLS identity becomes: transient, so failover routes around it."""
    who = f"peer {exc.got_peer}" if exc.got_peer else "no identity key"
    return IdentityMismatch(f"{hop} at {hop.url} refused: {who} answered there, not {hop.peer_id}")


def at_hop(error: SwarmError, hop: RemoteHop) -> SwarmError:
    """Mark `error` with the route hop it came from, so failover routes around that hop.

    A client-side annotation on the instance (read back with `hop_of`): the error
    vocabulary in swarm/errors.py stays free of client objects."""
    error.hop = hop  # type: ignore[attr-defined]
    return error


def hop_of(error: BaseException) -> RemoteHop | None:
    """The route hop `at_hop` marked `error` with, if any."""
    hop = getattr(error, "hop", None)
    return hop if isinstance(hop, RemoteHop) else None


def resolve_future(future: asyncio.Future | None, value: Any) -> None:
    if future is not None and not future.done():
        future.set_result(value)


def fail_future(future: asyncio.Future | None, error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)
