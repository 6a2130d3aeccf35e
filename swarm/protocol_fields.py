"""The session protocol's building blocks: limits, field readers, signed payloads, the
`Message` base and `NextHop`.

Each reader checks one field of a decoded message (type, range, the shape of an id or
token, a tensor against the receiver's `Limits`) and raises `BadMessage` naming it; the
message classes (swarm/protocol.py, swarm/protocol_control.py) are built from them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import torch

from swarm import wire
from swarm.addresses import base_url
from swarm.errors import AddressRefused, BadAddress, BadRequest, SwarmError
from swarm.identity import is_peer_id
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


def check_keys(message: Mapping[str, Any], kind: str, required: frozenset[str], optional: frozenset[str] = frozenset()) -> None:
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


def int_field(message: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = message[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadMessage(f"field '{name}' must be an integer")
    if not low <= value <= high:
        raise BadMessage(f"field '{name}' must be in [{low}, {high}]")
    return value


def float_field(message: Mapping[str, Any], name: str) -> float:
    value = message[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadMessage(f"field '{name}' must be a number")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise BadMessage(f"field '{name}' must be finite and >= 0")
    return value


def str_field(message: Mapping[str, Any], name: str, max_chars: int) -> str:
    value = message[name]
    if not isinstance(value, str):
        raise BadMessage(f"field '{name}' must be a string")
    if len(value) > max_chars:
        raise BadMessage(f"field '{name}' is over {max_chars} characters")
    return value


def bytes_field(message: Mapping[str, Any], name: str, low: int, high: int) -> bytes:
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


def blocks_field(message: Mapping[str, Any], name: str = "blocks") -> tuple[int, int]:
    value = message[name]
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise BadMessage(f"field '{name}' must be [start, end] integers")
    start, end = value
    if not 0 <= start < end <= MAX_LAYERS:
        raise BadMessage(f"field '{name}' must satisfy 0 <= start < end <= {MAX_LAYERS}")
    return start, end


def tensor_field(message: Mapping[str, Any], name: str, limits: Limits) -> tuple[torch.Tensor, str]:
    raw = message[name]
    tensor = wire.unpack_tensor(raw, hidden_size=limits.hidden_size, max_tokens=limits.max_tokens)
    return tensor, raw["dtype"]


def dtype_field(message: Mapping[str, Any], name: str = "dtype") -> str:
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


def next_field(message: Mapping[str, Any]) -> NextHop | None:
    raw = message.get("next")
    return None if raw is None else NextHop.from_wire(raw)

