"""Signed peer records: what a node says about itself, and the checks every copy must pass.

A `PeerRecord` is where to reach a node, which model and blocks it serves, how fast and
how busy it is, and until when this is true. The node signs it with its identity key, so
mDNS, announcements and gossip can all carry it through untrusted peers: a relay may drop
a record, never change it. A node that shuts down gracefully signs one last record with
`leaving` set: a tombstone (see swarm/peers.py for what a table does with it).

Checks happen in three places, so no bad record ever reaches routing:
- building a `PeerRecord` checks every field's type, range and size (the record's
  invariants, whoever builds it), so `from_wire` only has to shape raw input;
- `verify_record` checks what depends on keys and on the clock: the signature, the
  peer id against the key, expiry, clock skew, lifetime;
- `PeerTable.merge` (swarm/peers.py) keeps only the newest record per peer and never
  raises on records from outside.

Everything here is pure: time (`now`, unix seconds) is always an argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import msgpack

from swarm.addresses import base_url
from swarm.errors import AddressRefused, RecordRejected, SignatureInvalid
from swarm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, is_peer_id, peer_id_from_public_key, verify
from swarm.precision import DEFAULT_PRECISION, MAX_PRECISION_CHARS, PRECISIONS, declared

PROTOCOL_VERSION = 1  # the node wire protocol a record advertises
RECORD_TAG = b"layerswarm/peer-record/v1\n"  # domain separation: this key signs nothing else with this prefix

# Limits on one record, checked on every record built or received. A record is a few
# hundred bytes; these bound what one peer can make every table in the swarm hold.
MAX_RECORD_BYTES = 4096  # msgpack of the whole wire form, signature included
MAX_ADDRESSES = 8
MAX_ADDRESS_CHARS = 256
MAX_MODEL_FIELD_CHARS = 128
MAX_LAYERS = 4096
MAX_THROUGHPUT = 1e9  # blocks per second
MAX_FREE_KV_BYTES = 1 << 60
MAX_PROTOCOL = 0xFFFF

DEFAULT_MAX_SKEW_S = 30.0  # how far in the future a record's issued_at may lie (clock skew)
DEFAULT_MAX_TTL_S = 600.0  # longest lifetime a record may claim: a dead peer is gone from every table by then

MODEL_KEYS = ("architecture", "digest", "shape")  # a ModelFingerprint's to_dict(), sorted
# In `model` only when set, and never the default (one record, one encoding): what the node computes
# with (swarm/precision.py). Absent, a float32 node's record is what peers that predate the key accept.
OPTIONAL_MODEL_KEYS = ("precision",)
WIRE_KEYS = frozenset(
    {
        "peer_id", "public_key", "addresses", "model", "num_layers", "span", "throughput", "load",
        "free_kv_bytes", "protocol", "issued_at", "expires_at", "leaving", "signature",
    }
)  # fmt: skip
# Optional keys: on the wire only when set, so a record without them encodes (and signs) exactly as
# before they existed, and peers that predate them still accept it. When present the value must be
# the set one (one record, one encoding): `serves_head` is only ever True on the wire.
# `relayed`: the addresses are relays' URLs (node/relay_link.py); `offers_relay`: this peer relays for
# nodes that cannot be dialled (node/relay_host.py).
OPTIONAL_WIRE_KEYS = frozenset({"serves_head", "relayed", "offers_relay"})


@dataclass(frozen=True)
class PeerRecord:
    """One peer's signed statement about itself. Build it with `create` or `from_wire`."""

    peer_id: str  # peer_id_from_public_key(public_key)
    public_key: bytes = field(repr=False)  # raw Ed25519, 32 bytes
    addresses: tuple[str, ...]  # "http://host:port" URLs, preferred first; 1..MAX_ADDRESSES
    model: Mapping[str, str] | None  # fingerprint {architecture, shape, digest}, and precision unless float32; None: a bootstrap-only peer
    num_layers: int  # blocks in the whole model; 0 without a model
    span: tuple[int, int] | None  # blocks [start, end) served; None: none (yet)
    throughput: float  # blocks per second for one-token steps
    load: float  # active sessions / max sessions, in [0, 1]
    free_kv_bytes: int | None  # KV cache memory still free, if the node reports it
    protocol: int  # wire protocol version the node speaks
    issued_at: float  # unix seconds, when signed; newer replaces older
    expires_at: float  # unix seconds; after it nobody uses the record
    signature: bytes = field(repr=False)  # Ed25519 over signing_payload(), 64 bytes
    leaving: bool = False  # a signed goodbye (a tombstone): the peer is gone, drop it until this expires
    serves_head: bool = False  # applies the final norm and LM head for sessions ending at the last block (`--serve-head`)
    relayed: bool = False  # cannot be dialled: `addresses` are the URLs of relays that splice connections to it
    offers_relay: bool = False  # relays connections for nodes that cannot be dialled

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):  # a read-only copy: a signed record must not change
            object.__setattr__(self, "model", MappingProxyType(dict(self.model)))
        _check_fields(self)

    def __hash__(self) -> int:  # `model` is a mapping; the signature pins every other field
        return hash((self.peer_id, self.signature))

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        addresses: Sequence[str],
        now: float,
        ttl: float,
        model: Mapping[str, str] | None = None,
        num_layers: int = 0,
        span: tuple[int, int] | None = None,
        throughput: float = 0.0,
        load: float = 0.0,
        free_kv_bytes: int | None = None,
        protocol: int = PROTOCOL_VERSION,
        leaving: bool = False,
        serves_head: bool = False,
        relayed: bool = False,
        offers_relay: bool = False,
    ) -> PeerRecord:
        """A record signed by `identity`, valid from `now` for `ttl` seconds.

        `model` is a `ModelFingerprint.to_dict()`, with the node's precision where it is not float32
        (`swarm.precision.model_entry`). Fields are checked before signing.
        With `leaving` it is a tombstone: give it at least the ttl of the live records it
        replaces, so it outlives every one of them that could be replayed.
        """
        unsigned = cls(
            peer_id=identity.peer_id,
            public_key=identity.public_key_bytes,
            addresses=tuple(addresses),
            model=model,
            num_layers=num_layers,
            span=None if span is None else (span[0], span[1]),
            throughput=float(throughput),
            load=float(load),
            free_kv_bytes=free_kv_bytes,
            protocol=protocol,
            issued_at=float(now),
            expires_at=float(now) + float(ttl),
            signature=bytes(SIGNATURE_BYTES),  # placeholder, replaced below
            leaving=leaving,
            serves_head=serves_head,
            relayed=relayed,
            offers_relay=offers_relay,
        )
        return replace(unsigned, signature=identity.sign(unsigned.signing_payload()))

    @property
    def model_digest(self) -> str | None:
        return None if self.model is None else self.model["digest"]

    @property
    def precision(self) -> str:
        """What the node declares it computes with (swarm/precision.py): float32 when the record does not say."""
        return declared(self.model)

    def is_live(self, now: float) -> bool:
        return self.expires_at > now

    def signing_payload(self) -> bytes:
        """The bytes the signature covers: the tag, then msgpack of every field but the
        signature, keys sorted. Field types are fixed by `_check_fields` (floats are
        float64, ints are ints), so one record has exactly one encoding."""
        wire = self.to_wire()
        del wire["signature"]
        return RECORD_TAG + msgpack.packb(dict(sorted(wire.items())), use_bin_type=True)

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly dict: bytes for key and signature, lists for tuples."""
        wire = {
            "peer_id": self.peer_id,
            "public_key": self.public_key,
            "addresses": list(self.addresses),
            "model": None if self.model is None else {key: self.model[key] for key in (*MODEL_KEYS, *OPTIONAL_MODEL_KEYS) if key in self.model},
            "num_layers": self.num_layers,
            "span": None if self.span is None else list(self.span),
            "throughput": self.throughput,
            "load": self.load,
            "free_kv_bytes": self.free_kv_bytes,
            "protocol": self.protocol,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "leaving": self.leaving,
            "signature": self.signature,
        }
        for key in OPTIONAL_WIRE_KEYS:
            if getattr(self, key):
                wire[key] = True
        return wire

    @classmethod
    def from_wire(cls, raw: object) -> PeerRecord:
        """The record in a wire dict from anywhere; anything malformed is a typed error.

        Only shapes raw input (lists to tuples, ints to floats where a float is due);
        the constructor checks every value. Unknown keys are refused: the signature could
        not cover them. This does not verify the signature: see `verify_record`.
        """
        if not isinstance(raw, dict):
            raise RecordRejected("a peer record is a map", reason="malformed")
        if "signature" not in raw:
            raise SignatureInvalid("peer record is unsigned")
        if not WIRE_KEYS <= raw.keys() or raw.keys() - WIRE_KEYS - OPTIONAL_WIRE_KEYS:
            missing = sorted(key for key in WIRE_KEYS if key not in raw)
            unknown = sum(1 for key in raw if key not in WIRE_KEYS | OPTIONAL_WIRE_KEYS)
            raise RecordRejected(f"peer record lacks {missing} or has {unknown} unknown keys", reason="malformed")
        for key in OPTIONAL_WIRE_KEYS & raw.keys():
            if raw[key] is not True:
                raise RecordRejected(f"{key} is on the wire only when true", reason="malformed")
        addresses, span, model = raw["addresses"], raw["span"], raw["model"]
        if not isinstance(addresses, (list, tuple)):
            raise RecordRejected("addresses is a list", reason="malformed")
        if span is not None and not isinstance(span, (list, tuple)):
            raise RecordRejected("span is a list [start, end]", reason="malformed")
        if model is not None and not isinstance(model, dict):
            raise RecordRejected("model is a map", reason="malformed")
        return cls(
            peer_id=raw["peer_id"],
            public_key=raw["public_key"],
            addresses=tuple(addresses),
            model=model,
            num_layers=raw["num_layers"],
            span=None if span is None else tuple(span),  # type: ignore[arg-type]  # length checked by the constructor
            throughput=_as_float(raw["throughput"]),
            load=_as_float(raw["load"]),
            free_kv_bytes=raw["free_kv_bytes"],
            protocol=raw["protocol"],
            issued_at=_as_float(raw["issued_at"]),
            expires_at=_as_float(raw["expires_at"]),
            signature=raw["signature"],
            leaving=raw["leaving"],
            serves_head="serves_head" in raw,
            relayed="relayed" in raw,
            offers_relay="offers_relay" in raw,
        )

    def to_bytes(self) -> bytes:
        return msgpack.packb(self.to_wire(), use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerRecord:
        """`from_wire` of msgpack bytes; the size is checked before anything is decoded."""
        if len(data) > MAX_RECORD_BYTES:
            raise RecordRejected(f"peer record of {len(data)} bytes is over {MAX_RECORD_BYTES}", reason="oversized")
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as error:  # ExtraData, FormatError: ValueErrors
            raise RecordRejected(f"peer record is not msgpack ({type(error).__name__})", reason="malformed") from None
        return cls.from_wire(raw)


def verify_record(
    record: PeerRecord, now: float, *, max_skew: float = DEFAULT_MAX_SKEW_S, max_ttl: float = DEFAULT_MAX_TTL_S
) -> None:
    """Raise unless `record` may be used at `now`: `RecordRejected` (with a `reason`) or `SignatureInvalid`.

    Cheap checks come first; the signature, which costs tens of microseconds, last.
    """
    if peer_id_from_public_key(record.public_key) != record.peer_id:
        raise RecordRejected(f"peer id {record.peer_id} is not its key's", reason="peer_id_mismatch")
    lifetime = record.expires_at - record.issued_at  # seconds
    if lifetime > max_ttl:
        raise RecordRejected(f"lifetime {lifetime:.0f} s is over {max_ttl:.0f} s", reason="ttl_too_long")
    if record.issued_at > now + max_skew:
        raise RecordRejected(f"issued {record.issued_at - now:.0f} s in the future", reason="future")
    if record.expires_at <= now:
        raise RecordRejected(f"expired {now - record.expires_at:.0f} s ago", reason="expired")
    if not verify(record.public_key, record.signature, record.signing_payload()):
        raise SignatureInvalid(f"peer record of {record.peer_id} has a bad signature")


# --- field checks: one function, so a record is valid however it was built ----------------


def _as_float(value: object) -> object:
    """Wire floats may arrive as ints (JSON, other encoders); anything else is left for the checks."""
    if _is_int(value) and abs(value) <= 2**53:  # type: ignore[arg-type]  # exact as a float
        return float(value)  # type: ignore[arg-type]
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _malformed(message: str) -> RecordRejected:
    return RecordRejected(message, reason="malformed")


def _check_fields(record: PeerRecord) -> None:
    """Types, ranges and sizes of every field. Messages name fields, never quote remote values."""
    if not is_peer_id(record.peer_id):
        raise _malformed("peer_id is not a 32-character base32 peer id")
    if not isinstance(record.public_key, bytes) or len(record.public_key) != PUBLIC_KEY_BYTES:
        raise _malformed(f"public_key is not {PUBLIC_KEY_BYTES} bytes")
    if not isinstance(record.signature, bytes) or len(record.signature) != SIGNATURE_BYTES:
        raise SignatureInvalid(f"signature is not {SIGNATURE_BYTES} bytes")
    _check_addresses(record.addresses)
    _check_model(record.model)
    if not _is_int(record.num_layers):
        raise _malformed("num_layers is not an int")
    if record.model is None and (record.num_layers != 0 or record.span is not None):
        raise _malformed("a record without a model has num_layers 0 and no span")
    if record.model is not None and not 1 <= record.num_layers <= MAX_LAYERS:
        raise _malformed(f"num_layers is not in [1, {MAX_LAYERS}]")
    if record.span is not None:
        span = record.span
        if not (isinstance(span, tuple) and len(span) == 2 and _is_int(span[0]) and _is_int(span[1])):
            raise RecordRejected("span is not two ints", reason="bad_span")
        if not 0 <= span[0] < span[1] <= record.num_layers:
            raise RecordRejected(f"span is not a non-empty range inside [0, {record.num_layers})", reason="bad_span")
    if not _is_float(record.throughput) or not 0.0 <= record.throughput <= MAX_THROUGHPUT:
        raise _malformed("throughput is not a float in [0, 1e9]")
    if not _is_float(record.load) or not 0.0 <= record.load <= 1.0:
        raise _malformed("load is not a float in [0, 1]")
    free = record.free_kv_bytes
    if free is not None and not (_is_int(free) and 0 <= free <= MAX_FREE_KV_BYTES):
        raise _malformed("free_kv_bytes is not a non-negative int")
    if not _is_int(record.protocol) or not 1 <= record.protocol <= MAX_PROTOCOL:
        raise _malformed("protocol is not a version number")
    if not (_is_float(record.issued_at) and _is_float(record.expires_at) and 0.0 <= record.issued_at < record.expires_at):
        raise _malformed("issued_at and expires_at are not unix seconds with issued_at < expires_at")
    if not isinstance(record.leaving, bool):
        raise _malformed("leaving is not a boolean")
    for key in OPTIONAL_WIRE_KEYS:
        if not isinstance(getattr(record, key), bool):
            raise _malformed(f"{key} is not a boolean")
    if record.relayed and record.offers_relay:
        raise _malformed("a relayed peer cannot be dialled, so it cannot relay for others")
    if record.serves_head and (record.span is None or record.span[1] != record.num_layers):
        raise _malformed("only a peer serving the last block can serve the head")
    size = len(record.to_bytes())
    if size > MAX_RECORD_BYTES:
        raise RecordRejected(f"peer record of {size} bytes is over {MAX_RECORD_BYTES}", reason="oversized")


def _check_addresses(addresses: object) -> None:
    if not isinstance(addresses, tuple) or not addresses:
        raise _malformed("addresses is empty")
    if len(addresses) > MAX_ADDRESSES:
        raise RecordRejected(f"{len(addresses)} addresses is over {MAX_ADDRESSES}", reason="oversized")
    for index, address in enumerate(addresses):
        if not isinstance(address, str):
            raise _malformed(f"address {index} is not a string")
        if len(address) > MAX_ADDRESS_CHARS:
            raise RecordRejected(f"address {index} is over {MAX_ADDRESS_CHARS} characters", reason="oversized")
        if not is_base_url(address):
            raise _malformed(f"address {index} is not an http(s)://host:port URL")


def is_base_url(address: str) -> bool:
    """"http://host:port" or "https://host:port", nothing more (see `swarm.addresses.base_url`)."""
    try:
        base_url(address)
    except AddressRefused:
        return False
    return True


def _check_model(model: object) -> None:
    if model is None:
        return
    if not isinstance(model, Mapping) or not set(MODEL_KEYS) <= model.keys() <= {*MODEL_KEYS, *OPTIONAL_MODEL_KEYS}:
        raise _malformed(f"model is not a map of {list(MODEL_KEYS)} and optionally {list(OPTIONAL_MODEL_KEYS)}")
    for key in MODEL_KEYS:
        value = model[key]
        if not isinstance(value, str) or not value:
            raise _malformed(f"model {key} is not a non-empty string")
        if len(value) > MAX_MODEL_FIELD_CHARS:
            raise RecordRejected(f"model {key} is over {MAX_MODEL_FIELD_CHARS} characters", reason="oversized")
    if "precision" in model:
        precision = model["precision"]
        if not isinstance(precision, str):
            raise _malformed("model precision is not a string")
        if len(precision) > MAX_PRECISION_CHARS:
            raise RecordRejected(f"model precision is over {MAX_PRECISION_CHARS} characters", reason="oversized")
        if precision not in PRECISIONS or precision == DEFAULT_PRECISION:  # one encoding: float32 is said by leaving it out
            raise _malformed(f"model precision is not one of {', '.join(p for p in PRECISIONS if p != DEFAULT_PRECISION)}")
