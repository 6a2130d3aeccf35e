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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import msgpack
import torch

from swarm import wire
from swarm.addresses import base_url
from swarm.errors import AddressRefused, BadAddress, BadRequest, SwarmError
from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, is_peer_id
from swarm.records import MAX_LAYERS, MAX_RECORD_BYTES, PeerRecord

OPENED_TAG = b"layerswarm/session-opened/v1\n"  # a hop's signature over the client's nonce at open
PROOF_TAG = b"layerswarm/push-proof/v1\n"  # a next hop's signature over a pushing node's nonce

MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
MAX_STEP = 2**53 - 1  # step numbers count steps of one session: far below this
MAX_POSITION = 2**31 - 1
MAX_URL_CHARS = 256
MAX_MESSAGE_CHARS = 4096  # an error's human text
MAX_CODE_CHARS = 64
OUTPUTS = ("all", "last")
MAX_HEAD_K = 256  # most candidates a head-serving last hop returns per step (node/head_service.py)

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")  # secrets.token_urlsafe(16..48)
_ENVELOPE = frozenset({"type", "v"})


class BadMessage(BadRequest):
    """A message with a missing, unknown or ill-typed field, or a value out of range."""

    code = "bad_request"  # the wire code of any bad request: peers need no new case


@dataclass(frozen=True)
class Limits:
    """What the receiver allows in tensors: the model's hidden size and the most tokens per tensor."""

    hidden_size: int | None = None
    max_tokens: int | None = None


NO_LIMITS = Limits()


# --- field readers: each raises BadMessage naming the field ---------------------------------


def _check_keys(message: Mapping[str, Any], kind: str, required: frozenset[str], optional: frozenset[str] = frozenset()) -> None:
    # On every step: a dict check (not typing.Mapping's slow isinstance) and set differences.
    if not isinstance(message, dict):
        raise BadMessage(f"{kind} is not a map")
    if message.get("type") != kind:
        raise BadMessage(f"expected a '{kind}' message, not {message.get('type')!r}")
    keys = message.keys() - _ENVELOPE
    if not required <= keys:
        raise BadMessage(f"{kind} lacks field(s) {', '.join(sorted(required - keys))}")
    unknown = keys - required - optional
    if unknown:
        names = sorted(str(k)[:32] for k in unknown)[:4]
        raise BadMessage(f"{kind} has unknown field(s) {', '.join(names)}")


def _int(message: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = message[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadMessage(f"field '{name}' must be an integer")
    if not low <= value <= high:
        raise BadMessage(f"field '{name}' must be in [{low}, {high}]")
    return value


def _float(message: Mapping[str, Any], name: str) -> float:
    value = message[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadMessage(f"field '{name}' must be a number")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise BadMessage(f"field '{name}' must be finite and >= 0")
    return value


def _str(message: Mapping[str, Any], name: str, max_chars: int) -> str:
    value = message[name]
    if not isinstance(value, str):
        raise BadMessage(f"field '{name}' must be a string")
    if len(value) > max_chars:
        raise BadMessage(f"field '{name}' is over {max_chars} characters")
    return value


def _bytes(message: Mapping[str, Any], name: str, low: int, high: int) -> bytes:
    value = message[name]
    if not isinstance(value, bytes):
        raise BadMessage(f"field '{name}' must be bytes")
    if not low <= len(value) <= high:
        raise BadMessage(f"field '{name}' must be {low}..{high} bytes")
    return value


def check_session_id(value: object, name: str = "session") -> str:
    if not isinstance(value, str) or not _SESSION_ID.fullmatch(value):  # match's `$` passes a final newline
        raise BadMessage(f"field '{name}' must be 1-64 characters of letters, digits, '-' or '_'")
    return value


def check_token(value: object, name: str = "token") -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise BadMessage(f"field '{name}' must be 16-64 characters of letters, digits, '-' or '_'")
    return value


def check_peer_id(value: object, name: str = "peer_id") -> str:
    if not is_peer_id(value):
        raise BadMessage(f"field '{name}' is not a peer id")
    return value  # type: ignore[return-value]


def _blocks(message: Mapping[str, Any], name: str = "blocks") -> tuple[int, int]:
    value = message[name]
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadMessage(f"field '{name}' must be [start, end] integers")
    start, end = value
    if not 0 <= start < end <= MAX_LAYERS:
        raise BadMessage(f"field '{name}' must satisfy 0 <= start < end <= {MAX_LAYERS}")
    return start, end


def _tensor(message: Mapping[str, Any], name: str, limits: Limits) -> tuple[torch.Tensor, str]:
    raw = message[name]
    tensor = wire.unpack_tensor(raw, hidden_size=limits.hidden_size, max_tokens=limits.max_tokens)
    return tensor, raw["dtype"]


def _dtype(message: Mapping[str, Any], name: str = "dtype") -> str:
    value = message[name]
    wire.wire_dtype(value)  # BadRequest for anything unknown
    return value


def check_base_url(url: object) -> str:
    """`url` as a canonical bare http(s)://host:port, else `BadAddress`.

    No path, query, fragment or user info: a node dials `<url>/session` and nothing a
    stranger can steer (the rules are `swarm.addresses.base_url`'s)."""
    try:
        return base_url(url)
    except AddressRefused as why:
        raise BadAddress(f"next hop url must be a bare http(s)://host:port: {why}") from None


# --- payloads that get signed --------------------------------------------------------------


def opened_payload(nonce: bytes, session: str, blocks: tuple[int, int]) -> bytes:
    """What a hop signs at open: the client's nonce, the session id and the blocks it serves."""
    return OPENED_TAG + msgpack.packb([nonce, session, blocks[0], blocks[1]], use_bin_type=True)


def proof_payload(nonce: bytes) -> bytes:
    """What a next hop signs to prove its key on a push connection."""
    return PROOF_TAG + nonce


# --- messages -------------------------------------------------------------------------------


class Message:
    """Base of every session message: `TYPE` on the wire, `to_wire()` and `from_wire(message, limits)`."""

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Message:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class NextHop:
    """Where a hop pushes its output: the next hop's session, who it is, and its push token.

    `record` is the next hop's signed peer record, when the client has it (from
    discovery or from that hop's `opened`): it lets a node that does not know the
    peer check the address belongs to it. The node still proves the key by challenge.
    """

    url: str
    session: str
    peer_id: str
    token: str
    record: PeerRecord | None = None

    _REQUIRED: ClassVar[frozenset[str]] = frozenset({"url", "session", "peer_id", "token"})
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset({"record"})

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "session": self.session, "peer_id": self.peer_id, "token": self.token}
        if self.record is not None:
            out["record"] = self.record.to_bytes()
        return out

    @classmethod
    def from_wire(cls, raw: object) -> NextHop:
        if not isinstance(raw, dict):
            raise BadMessage("field 'next' must be a map of url, session, peer_id and token")
        keys = set(raw)
        if not cls._REQUIRED <= keys or keys - cls._REQUIRED - cls._OPTIONAL:
            raise BadMessage("field 'next' must hold exactly url, session, peer_id, token and optionally record")
        record = None
        if raw.get("record") is not None:
            data = raw["record"]
            if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
                raise BadMessage(f"next.record must be a peer record of at most {MAX_RECORD_BYTES} bytes")
            try:
                record = PeerRecord.from_bytes(data)
            except SwarmError as exc:
                raise BadMessage(f"next.record is not a peer record: {exc}") from None
            if record.peer_id != raw["peer_id"]:
                raise BadMessage("next.record is not the record of next.peer_id")
        return cls(
            url=check_base_url(raw["url"]),
            session=check_session_id(raw["session"], "next.session"),
            peer_id=check_peer_id(raw["peer_id"], "next.peer_id"),
            token=check_token(raw["token"], "next.token"),
            record=record,
        )


def _next(message: Mapping[str, Any]) -> NextHop | None:
    raw = message.get("next")
    return None if raw is None else NextHop.from_wire(raw)


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
        _check_keys(message, cls.TYPE, frozenset({"session", "blocks", "max_length", "dtype", "model", "nonce", "token"}), frozenset({"next", "tap", "head"}))
        tap = message.get("tap")
        if tap is not None and not isinstance(tap, bool):
            raise BadMessage("field 'tap' must be a boolean")
        return cls(
            session=check_session_id(message["session"]),
            blocks=_blocks(message),
            max_length=_int(message, "max_length", 1, MAX_POSITION),
            dtype=_dtype(message),
            model=_str(message, "model", 128),
            nonce=_bytes(message, "nonce", MIN_NONCE_BYTES, MAX_NONCE_BYTES),
            token=check_token(message["token"]),
            next=_next(message),
            tap=bool(tap),
            head=_int(message, "head", 1, MAX_HEAD_K) if "head" in message else 0,
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
        _check_keys(message, cls.TYPE, frozenset({"session", "blocks", "max_length", "peer_id", "public_key", "signature"}), frozenset({"record"}))
        record = None
        if message.get("record") is not None:
            data = _bytes(message, "record", 1, MAX_RECORD_BYTES)
            try:
                record = PeerRecord.from_bytes(data)
            except SwarmError as exc:
                raise BadMessage(f"opened.record is not a peer record: {exc}") from None
        return cls(
            session=check_session_id(message["session"]),
            blocks=_blocks(message),
            max_length=_int(message, "max_length", 1, MAX_POSITION),
            peer_id=check_peer_id(message["peer_id"]),
            public_key=_bytes(message, "public_key", PUBLIC_KEY_BYTES, PUBLIC_KEY_BYTES),
            signature=_bytes(message, "signature", SIGNATURE_BYTES, SIGNATURE_BYTES),
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
        _check_keys(message, cls.TYPE, frozenset({"session", "step", "position", "hidden"}), frozenset({"output", "token"}))
        output = message.get("output", "all")
        if output not in OUTPUTS:
            raise BadMessage("field 'output' must be 'all' or 'last'")
        token = message.get("token")
        session = check_session_id(message["session"])
        step = _int(message, "step", 0, MAX_STEP)
        position = _int(message, "position", 0, MAX_POSITION)
        hidden, dtype = _tensor(message, "hidden", limits)
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
            step=_int(message, "step", 0, MAX_STEP),
            blocks=_blocks(message),
            compute_ms=_float(message, "compute_ms"),
            queue_ms=_float(message, "queue_ms"),
            batch=_int(message, "batch", 0, 2**31),
            seal=_bytes(message, "seal", SIGNATURE_BYTES, SIGNATURE_BYTES),
        )

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS) -> Ack:
        _check_keys(message, cls.TYPE, _TIMING, frozenset({"hidden"}))
        fields = cls._timing(message)
        if message.get("hidden") is None:
            return cls(**fields)
        hidden, dtype = _tensor(message, "hidden", limits)
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
        _check_keys(message, cls.TYPE, _TIMING | {"hidden"})
        hidden, dtype = _tensor(message, "hidden", limits)
        return cls(**Ack._timing(message), hidden=hidden, dtype=dtype)


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
        _check_keys(message, cls.TYPE, frozenset({"session"}), frozenset({"next"}))
        return cls(check_session_id(message["session"]), _next(message))


@dataclass(frozen=True)
class _SessionOnly(Message):
    session: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "session": self.session}

    @classmethod
    def from_wire(cls, message: Mapping[str, Any], limits: Limits = NO_LIMITS):
        _check_keys(message, cls.TYPE, frozenset({"session"}))
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
        _check_keys(message, cls.TYPE, frozenset({"code", "message"}), frozenset({"session", "step", "hop"}))
        session = message.get("session")
        step = message.get("step")
        hop = message.get("hop")
        return cls(
            code=_str(message, "code", MAX_CODE_CHARS),
            message=_str(message, "message", MAX_MESSAGE_CHARS),
            session=None if session is None else check_session_id(session),
            step=None if step is None else _int(message, "step", 0, MAX_STEP),
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
        _check_keys(message, cls.TYPE, frozenset({"nonce"}))
        return cls(_bytes(message, "nonce", MIN_NONCE_BYTES, MAX_NONCE_BYTES))


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
        _check_keys(message, cls.TYPE, frozenset({"peer_id", "public_key", "signature"}))
        return cls(
            peer_id=check_peer_id(message["peer_id"]),
            public_key=_bytes(message, "public_key", PUBLIC_KEY_BYTES, PUBLIC_KEY_BYTES),
            signature=_bytes(message, "signature", SIGNATURE_BYTES, SIGNATURE_BYTES),
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
        _check_keys(message, cls.TYPE, frozenset({"blocks", "model", "hidden"}))
        hidden, dtype = _tensor(message, "hidden", limits)
        return cls(_blocks(message), _str(message, "model", 128), hidden, dtype)


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
