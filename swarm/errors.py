"""The typed error vocabulary of layerswarm.

Every error a node can send or a client can raise is a subclass of `SwarmError`
with a stable wire `code`. A node turns an exception into an error frame
`{"type": "error", "code": ..., "message": ...}`; the client turns the code back
into the same class with `error_from_code`, so both sides speak one vocabulary.

Only `TransientError` subclasses are worth retrying (elsewhere or later).
"""

from __future__ import annotations


class SwarmError(Exception):
    """Root of every layerswarm error. `code` is what travels on the wire."""

    code = "internal"


class TransientError(SwarmError):
    """The same request may succeed later or on another peer."""

    code = "transient"


# --- model and checkpoint -------------------------------------------------------


class ModelNotFound(SwarmError):
    """A model path that does not exist, or an alias nobody knows."""

    code = "model_not_found"


class UnsupportedModel(SwarmError):
    """A checkpoint of an architecture or tensor type we cannot run."""

    code = "unsupported_model"


class CheckpointError(SwarmError):
    """A checkpoint that claims to be supported but is missing tensors or has wrong shapes."""

    code = "checkpoint_error"


class BadSpan(SwarmError):
    """A block range that is empty or lies outside [0, num_layers)."""

    code = "bad_span"


class ModelMismatch(SwarmError):
    """Two parties disagree on the model fingerprint."""

    code = "model_mismatch"


# --- requests -----------------------------------------------------------------------


class BadRequest(SwarmError):
    """A malformed or invalid request: bad frame, wrong shape or dtype, bad values."""

    code = "bad_request"


class UnsupportedVersion(BadRequest):
    """A message with a protocol version this peer does not speak."""

    code = "unsupported_version"


class FrameTooLarge(BadRequest):
    """A frame over the configured size limit, refused before it is decoded."""

    code = "frame_too_large"


class SessionNotFound(SwarmError):
    """A step or close for a session this node does not hold (never opened, closed, expired)."""

    code = "session_not_found"


class PositionError(BadRequest):
    """A step whose position skips ahead of or rewinds past the session's cache."""

    code = "bad_position"


class LengthExceeded(BadRequest):
    """A step that would run past the session's max_length."""

    code = "length_exceeded"


class Busy(TransientError):
    """The peer has no room (sessions or KV memory) right now: go elsewhere."""

    code = "busy"


class ShuttingDown(TransientError):
    """The peer is leaving the swarm: move the session elsewhere."""

    code = "shutting_down"


class PeerUnavailable(TransientError):
    """A peer could not be reached, dropped the connection or missed its deadline."""

    code = "peer_unavailable"


class HeadNotServed(TransientError):
    """A session asked its hop to apply the LM head, and this hop does not: it was not started with
    `--serve-head`, or the session does not end at the model's last block. Another peer may."""

    code = "head_not_served"


class NoRoute(SwarmError):
    """No chain of known peers covers every block of the model."""

    code = "no_route"


class NoFullPrecisionRoute(NoRoute):
    """The client requires full precision, and only quantized peers (int8) serve some blocks (or a
    hop it was given declares int8): swarm/precision.py."""

    code = "no_full_precision_route"


class SignatureInvalid(SwarmError):
    """A record or message whose signature does not verify."""

    code = "signature_invalid"


# --- sessions as capabilities, hops that prove who they are ------------------------------


class NotPermitted(BadRequest):
    """A frame about a session from someone who may not send it: `close`/`retarget` from anyone
    but the owner, a pushed step without the session's push token, a second `prove`."""

    code = "not_permitted"


class BadAddress(BadRequest):
    """A next hop that is not a bare http(s)://host:port URL of a peer proven to serve the next blocks."""

    code = "bad_address"


class HopNotProven(TransientError):
    """A hop (or a node's next hop) that did not prove it holds the key of the peer it was routed
    to: a wrong key, a bad signature, no answer to the challenge. Route around it."""

    code = "hop_not_proven"


class Convicted(TransientError):
    """A peer convicted of sending outputs its blocks do not compute (node/court.py): this node will
    not push to it nor take it back. Route around it."""

    code = "convicted"


class IdentityMismatch(TransientError):
    """The peer at an address presented another identity in its TLS certificate than the peer it
    was dialled as: a man in the middle, or a node answering at another's address. Route around it."""

    code = "identity_mismatch"


# --- identity and peer records ---------------------------------------------------------


class KeyFileError(SwarmError):
    """A key file that cannot be read or holds no key: a node's Ed25519 key (fix or delete it), or a
    swarm key (`--swarm-key`) that is missing, malformed or readable by others."""

    code = "key_file_error"


class RecordRejected(BadRequest):
    """A peer record refused on checking: malformed, oversized, expired, stale, bound to another key.

    `reason` is a short stable string for counters and logs (`"expired"`, `"oversized"`, ...);
    the wire code stays `record_rejected`. A bad signature is `SignatureInvalid` instead.
    """

    code = "record_rejected"

    def __init__(self, message: str, reason: str = "rejected") -> None:
        super().__init__(message)
        self.reason = reason


class AddressRefused(BadRequest):
    """An address this node will not dial: not a base URL, or outside its address policy (swarm/addresses.py)."""

    code = "address_refused"


# --- private swarms ------------------------------------------------------------------------


class NotMember(SwarmError):
    """A party that did not prove it holds the swarm key: a request refused before any work (no,
    stale, replayed or wrong proof, or a proof sent to an open node), or an answer a private client
    refuses (a peer that did not prove the key back). Never transient: the two are in different swarms.

    `reason` is a short stable string for counters and logs (`"no_proof"`, `"replayed"`, ...);
    the wire code stays `not_member`.
    """

    code = "not_member"

    def __init__(self, message: str, reason: str = "not_member") -> None:
        super().__init__(message)
        self.reason = reason


def _all_subclasses(cls: type[SwarmError]) -> list[type[SwarmError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


def error_from_code(code: str, message: str) -> SwarmError:
    """The exception a wire error `code` stands for; unknown codes become a plain `SwarmError`."""
    for cls in _all_subclasses(SwarmError):
        if cls.code == code:
            return cls(message)
    error = SwarmError(message)
    error.code = code
    return error
