"""The session protocol's control messages: retarget, close, draining, errors, key proofs on
push connections, and the stateless `forward`. Data messages (open, step, ack, result) and
`parse` are in swarm/protocol.py, which re-exports these."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from swarm import wire
from swarm.errors import SwarmError
from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from swarm.protocol_fields import (
    MAX_CODE_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_NONCE_BYTES,
    MAX_STEP,
    MIN_NONCE_BYTES,
    NO_LIMITS,
    Limits,
    Message,
    NextHop,
    blocks_field,
    bytes_field,
    check_keys,
    check_peer_id,
    check_session_id,
    int_field,
    next_field,
    str_field,
    tensor_field,
)


@dataclass(frozen=True)
class Retarget(Message):
    """The owner points its session's output elsewhere (or, `next` None, back to itself)."""

    TYPE: ClassVar[str] = "retarget"
    session: str
    next: NextHop | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "session": self.session, "next": None if self.next is None else self.next.to_wire()}

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Retarget:
        check_keys(message, cls.TYPE, frozenset({"session"}), frozenset({"next"}))
        return cls(check_session_id(message["session"]), next_field(message))


@dataclass(frozen=True)
class _SessionOnly(Message):
    session: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "session": self.session}

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS):
        check_keys(message, cls.TYPE, frozenset({"session"}))
        return cls(check_session_id(message["session"]))


@dataclass(frozen=True)
class Retargeted(_SessionOnly):
    TYPE: ClassVar[str] = "retargeted"


@dataclass(frozen=True)
class Close(_SessionOnly):
    TYPE: ClassVar[str] = "close"


@dataclass(frozen=True)
class Closed(_SessionOnly):
    TYPE: ClassVar[str] = "closed"


@dataclass(frozen=True)
class Draining(_SessionOnly):
    """The node is leaving (or moving): move this session elsewhere; it is served meanwhile."""

    TYPE: ClassVar[str] = "draining"


@dataclass(frozen=True)
class Error(Message):
    """A typed refusal: `code` is a SwarmError's wire code. `hop` names the peer at fault when
    it is not the sender (a next hop that could not be reached or did not prove its key)."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    session: str | None = None
    step: int | None = None
    hop: str | None = None  # a peer id

    @classmethod
    def of(cls, error: SwarmError, session: str | None = None, step: int | None = None, hop: str | None = None) -> Error:
        return cls(error.code, str(error)[:MAX_MESSAGE_CHARS], session, step, hop)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE, "code": self.code, "message": self.message}
        for name in ("session", "step", "hop"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Error:
        check_keys(message, cls.TYPE, frozenset({"code", "message"}), frozenset({"session", "step", "hop"}))
        session = message.get("session")
        step = message.get("step")
        hop = message.get("hop")
        return cls(
            code=str_field(message, "code", MAX_CODE_CHARS),
            message=str_field(message, "message", MAX_MESSAGE_CHARS),
            session=None if session is None else check_session_id(session),
            step=None if step is None else int_field(message, "step", 0, MAX_STEP),
            hop=None if hop is None else check_peer_id(hop, "hop"),
        )


@dataclass(frozen=True)
class Prove(Message):
    """A pushing node asks the next hop to prove its key before it sends any activation."""

    TYPE: ClassVar[str] = "prove"
    nonce: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "nonce": self.nonce}

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Prove:
        check_keys(message, cls.TYPE, frozenset({"nonce"}))
        return cls(bytes_field(message, "nonce", MIN_NONCE_BYTES, MAX_NONCE_BYTES))


@dataclass(frozen=True)
class Proof(Message):
    TYPE: ClassVar[str] = "proof"
    peer_id: str
    public_key: bytes
    signature: bytes  # over proof_payload(nonce)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "peer_id": self.peer_id, "public_key": self.public_key, "signature": self.signature}

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Proof:
        check_keys(message, cls.TYPE, frozenset({"peer_id", "public_key", "signature"}))
        return cls(
            peer_id=check_peer_id(message["peer_id"]),
            public_key=bytes_field(message, "public_key", PUBLIC_KEY_BYTES, PUBLIC_KEY_BYTES),
            signature=bytes_field(message, "signature", SIGNATURE_BYTES, SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class Forward(Message):
    """`POST /forward`: hidden states through `blocks` without any session (stateless)."""

    TYPE: ClassVar[str] = "forward"
    blocks: tuple[int, int]
    model: str
    hidden: torch.Tensor
    dtype: str = "float32"

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "blocks": list(self.blocks), "model": self.model, "hidden": wire.pack_tensor(self.hidden, self.dtype)}

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Forward:
        check_keys(message, cls.TYPE, frozenset({"blocks", "model", "hidden"}))
        hidden, dtype = tensor_field(message, "hidden", limits)
        return cls(blocks_field(message), str_field(message, "model", 128), hidden, dtype)

