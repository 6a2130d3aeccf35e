"""The session protocol as types: one frozen dataclass per message, checked whole on the way in.

Every message a node or client sends on `/session` is built from one of these
classes and read back with `from_wire`, which checks *every* field (types,
ranges, the shape of ids and tokens, tensors against the limits passed in) and
raises a typed `BadRequest` subclass before anything acts on the message. So a
handler never sees half a message, and a frame changes no state unless all of
it is valid.

`from_wire(message, limits)` is a pure function of the decoded dict and the
explicit `Limits`: no clock, no network, no node state. `parse` picks the class
by the message's `type`.

Identity on the wire (see DESIGN.md, "who is who"):
- `open` carries a fresh random `nonce`; the hop answers `opened` with its peer
  id, public key and an Ed25519 signature over `opened_payload(nonce, session,
  blocks)`: the client checks that the key hashes to the peer id it routed by.
- `open` also carries the hop's secret push `token`; the hop before it learns
  it in `next.token`, and every pushed `step` carries it.
- before a node pushes to a next hop it sends `prove {nonce}` on the push
  connection; the next hop answers `proof` signed over `proof_payload(nonce)`.
Both signatures are domain separated by their own tag, so neither can be
replayed as the other, nor as a peer record.

The field readers, limits and signed payloads are in swarm/protocol_fields.py and the
control messages in swarm/protocol_control.py; every public name is importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from swarm import wire
from swarm.errors import SwarmError
from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from swarm.protocol_control import Close, Closed, Draining, Error, Forward, Proof, Prove, Retarget, Retargeted
from swarm.protocol_fields import (  # noqa: F401 - re-exported: callers import the protocol from here
    MAX_CODE_CHARS,
    MAX_HEAD_K,
    MAX_MESSAGE_CHARS,
    MAX_NONCE_BYTES,
    MAX_POSITION,
    MAX_STEP,
    MAX_URL_CHARS,
    MIN_NONCE_BYTES,
    NO_LIMITS,
    OPENED_TAG,
    OUTPUTS,
    PROOF_TAG,
    BadMessage,
    Limits,
    Message,
    NextHop,
    blocks_field,
    bytes_field,
    check_base_url,
    check_keys,
    check_peer_id,
    check_session_id,
    check_token,
    dtype_field,
    float_field,
    int_field,
    next_field,
    opened_payload,
    proof_payload,
    str_field,
    tensor_field,
)
from swarm.records import MAX_RECORD_BYTES, PeerRecord


@dataclass(frozen=True)
class Open(Message):
    TYPE: ClassVar[str] = "open"
    session: str
    blocks: tuple[int, int]
    max_length: int
    dtype: str
    model: str
    nonce: bytes  # fresh random bytes: the hop signs them in `opened`
    token: str  # this hop's push token: a step pushed by the previous hop must carry it
    next: NextHop | None = None
    tap: bool = False  # the owner wants every output this hop pushes on, in its `ack` (to verify it later)
    head: int = 0  # K > 0: this last hop applies the LM head and answers the top K (node/head_service.py)

    def to_wire(self) -> dict[str, Any]:
        out = {
            "type": self.TYPE, "session": self.session, "blocks": list(self.blocks), "max_length": self.max_length,
            "dtype": self.dtype, "model": self.model, "nonce": self.nonce, "token": self.token,
            "next": None if self.next is None else self.next.to_wire(),
        }  # fmt: skip
        if self.tap:
            out["tap"] = True
        if self.head:
            out["head"] = self.head
        return out

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Open:
        check_keys(message, cls.TYPE, frozenset({"session", "blocks", "max_length", "dtype", "model", "nonce", "token"}), frozenset({"next", "tap", "head"}))
        tap = message.get("tap")
        if tap is not None and not isinstance(tap, bool):
            raise BadMessage("field 'tap' must be a boolean")
        return cls(
            session=check_session_id(message["session"]),
            blocks=blocks_field(message),
            max_length=int_field(message, "max_length", 1, MAX_POSITION),
            dtype=dtype_field(message),
            model=str_field(message, "model", 128),
            nonce=bytes_field(message, "nonce", MIN_NONCE_BYTES, MAX_NONCE_BYTES),
            token=check_token(message["token"]),
            next=next_field(message),
            tap=bool(tap),
            head=int_field(message, "head", 1, MAX_HEAD_K) if "head" in message else 0,
        )


@dataclass(frozen=True)
class Opened(Message):
    """A hop's answer to `open`: who it is, proven by a signature over the client's nonce."""

    TYPE: ClassVar[str] = "opened"
    session: str
    blocks: tuple[int, int]
    max_length: int
    peer_id: str
    public_key: bytes
    signature: bytes  # over opened_payload(nonce, session, blocks)
    record: PeerRecord | None = None  # the hop's own signed record: the client passes it on in `next.record`

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE, "session": self.session, "blocks": list(self.blocks), "max_length": self.max_length,
            "peer_id": self.peer_id, "public_key": self.public_key, "signature": self.signature,
            "record": None if self.record is None else self.record.to_bytes(),
        }  # fmt: skip

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Opened:
        check_keys(message, cls.TYPE, frozenset({"session", "blocks", "max_length", "peer_id", "public_key", "signature"}), frozenset({"record"}))
        record = None
        if message.get("record") is not None:
            data = bytes_field(message, "record", 1, MAX_RECORD_BYTES)
            try:
                record = PeerRecord.from_bytes(data)
            except SwarmError as exc:
                raise BadMessage(f"opened.record is not a peer record: {exc}") from None
        return cls(
            session=check_session_id(message["session"]),
            blocks=blocks_field(message),
            max_length=int_field(message, "max_length", 1, MAX_POSITION),
            peer_id=check_peer_id(message["peer_id"]),
            public_key=bytes_field(message, "public_key", PUBLIC_KEY_BYTES, PUBLIC_KEY_BYTES),
            signature=bytes_field(message, "signature", SIGNATURE_BYTES, SIGNATURE_BYTES),
            record=record,
        )


@dataclass(frozen=True)
class Step(Message):
    """Hidden states [T, D] at `position` for one session: from its owner, or pushed with the session's token."""

    TYPE: ClassVar[str] = "step"
    session: str
    step: int
    position: int
    hidden: torch.Tensor
    dtype: str = "float32"  # the wire dtype of `hidden`
    output: str = "all"
    token: str | None = None  # present on a push from the previous hop

    def to_wire(self) -> dict[str, Any]:
        out = {
            "type": self.TYPE, "session": self.session, "step": self.step, "position": self.position,
            "output": self.output, "hidden": wire.pack_tensor(self.hidden, self.dtype),
        }  # fmt: skip
        if self.token is not None:
            out["token"] = self.token
        return out

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Step:
        check_keys(message, cls.TYPE, frozenset({"session", "step", "position", "hidden"}), frozenset({"output", "token"}))
        output = message.get("output", "all")
        if output not in OUTPUTS:
            raise BadMessage("field 'output' must be 'all' or 'last'")
        token = message.get("token")
        session = check_session_id(message["session"])
        step = int_field(message, "step", 0, MAX_STEP)
        position = int_field(message, "position", 0, MAX_POSITION)
        hidden, dtype = tensor_field(message, "hidden", limits)
        return cls(session, step, position, hidden, dtype, output, None if token is None else check_token(token))


_TIMING = frozenset({"session", "step", "blocks", "compute_ms", "queue_ms", "batch", "seal"})


@dataclass(frozen=True)
class Ack(Message):
    """A hop ran a step and pushed it on (every hop but the last -> the session's owner).

    `seal` is the hop's signature over its transcript after this step (swarm/seal.py). In a
    tapped session (`Open.tap`) `hidden` is the output exactly as the hop pushed it on, in
    wire dtype `dtype`; otherwise both are None."""

    TYPE: ClassVar[str] = "ack"
    session: str
    step: int
    blocks: tuple[int, int]
    compute_ms: float  # the model alone
    queue_ms: float  # from arrival to result
    batch: int  # sessions in the batch the step rode in
    seal: bytes
    hidden: torch.Tensor | None = None
    dtype: str | None = None  # the wire dtype of `hidden`, when present

    def to_wire(self) -> dict[str, Any]:
        out = {
            "type": self.TYPE, "session": self.session, "step": self.step, "blocks": list(self.blocks),
            "compute_ms": self.compute_ms, "queue_ms": self.queue_ms, "batch": self.batch, "seal": self.seal,
        }  # fmt: skip
        if self.hidden is not None:
            out["hidden"] = wire.pack_tensor(self.hidden, self.dtype or "float32")
        return out

    @classmethod
    def _timing(cls, message: Mapping[str, Any]) -> dict[str, Any]:
        return dict(
            session=check_session_id(message["session"]),
            step=int_field(message, "step", 0, MAX_STEP),
            blocks=blocks_field(message),
            compute_ms=float_field(message, "compute_ms"),
            queue_ms=float_field(message, "queue_ms"),
            batch=int_field(message, "batch", 0, 2**31),
            seal=bytes_field(message, "seal", SIGNATURE_BYTES, SIGNATURE_BYTES),
        )

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Ack:
        check_keys(message, cls.TYPE, _TIMING, frozenset({"hidden"}))
        fields = cls._timing(message)
        if message.get("hidden") is None:
            return cls(**fields)
        hidden, dtype = tensor_field(message, "hidden", limits)
        return cls(**fields, hidden=hidden, dtype=dtype)


@dataclass(frozen=True)
class Result(Message):
    """The last hop's output of a step (-> the session's owner), sealed like an `Ack`."""

    TYPE: ClassVar[str] = "result"
    session: str
    step: int
    blocks: tuple[int, int]
    compute_ms: float
    queue_ms: float
    batch: int
    seal: bytes
    hidden: torch.Tensor
    dtype: str = "float32"

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE, "session": self.session, "step": self.step, "blocks": list(self.blocks),
            "compute_ms": self.compute_ms, "queue_ms": self.queue_ms, "batch": self.batch, "seal": self.seal,
            "hidden": wire.pack_tensor(self.hidden, self.dtype),
        }  # fmt: skip

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Result:
        check_keys(message, cls.TYPE, _TIMING | {"hidden"})
        hidden, dtype = tensor_field(message, "hidden", limits)
        return cls(**Ack._timing(message), hidden=hidden, dtype=dtype)


MESSAGES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Open, Opened, Step, Ack, Result, Retarget, Retargeted, Close, Closed, Draining, Error, Prove, Proof, Forward)
}


def parse(message: Mapping[str, Any], limits: Limits = NO_LIMITS, allowed: frozenset[str] | None = None) -> Message:
    """The typed message of a decoded frame (`wire.decode`); `allowed` limits which types are accepted."""
    kind = message.get("type") if isinstance(message, dict) else None
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None or (allowed is not None and kind not in allowed):
        raise BadMessage(f"unexpected message type {str(kind)[:32]!r}")
    return cls.from_wire(message, limits)
