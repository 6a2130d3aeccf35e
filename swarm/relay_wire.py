"""What a relay and the nodes it relays for say to each other: names, tags and the data preamble.

A node that cannot be dialled (behind NAT) keeps a control websocket open to a relay
(`GET /relay/attach` on the relay) and names the relay's URL as its own address in its
signed record. A client, or a previous hop, dials that address pinned to the *node's*
peer id and puts `sni_name(node)` in the TLS ClientHello's server name. The relay reads
that name before any TLS of its own (node/accept.py), asks the node over its control
websocket to dial back with a one-time token, and splices the two TCP connections. The
TLS session runs end to end between the dialler and the node, so the relay forwards
ciphertext it holds no key for.

Everything here is pure.
"""

from __future__ import annotations

import secrets

from swarm.identity import is_peer_id

SNI_SUFFIX = ".layerswarm"  # a pinned dial names its peer as "<peer id>.layerswarm" in the ClientHello
ATTACH_TAG = b"layerswarm/relay-attach/v1\n"  # domain separation of the attach signature

# A relayed node's data connection starts, in plaintext, with MAGIC + a 32-hex token + "\n", then
# carries the dialler's TLS untouched. No TLS ClientHello starts with these bytes (0x16 does).
PREAMBLE_MAGIC = b"LSRELAY1 "
TOKEN_CHARS = 32
PREAMBLE_BYTES = len(PREAMBLE_MAGIC) + TOKEN_CHARS + 1
_HEX = frozenset("0123456789abcdef")


def sni_name(peer_id: str) -> str:
    """The TLS server name of a pinned dial to `peer_id`."""
    return f"{peer_id}{SNI_SUFFIX}"


def peer_of_sni(name: str | None) -> str | None:
    """The peer id a ClientHello's server name asks for, or None when it names no peer."""
    name = (name or "").lower()  # server names are case-insensitive
    if not name.endswith(SNI_SUFFIX):
        return None
    peer = name[: -len(SNI_SUFFIX)]
    return peer if is_peer_id(peer) else None


def new_token() -> str:
    """A one-time dial-back token: 128 random bits, as 32 hex characters."""
    return secrets.token_hex(TOKEN_CHARS // 2)


def data_preamble(token: str) -> bytes:
    """The first bytes of a relayed node's data connection for `token`."""
    if not is_token(token):
        raise ValueError("a relay token is 32 lowercase hex characters")
    return PREAMBLE_MAGIC + token.encode("ascii") + b"\n"


def parse_preamble(data: bytes) -> str | None:
    """The token of a complete preamble (`data` holds at least PREAMBLE_BYTES), else None."""
    if len(data) < PREAMBLE_BYTES or not data.startswith(PREAMBLE_MAGIC) or data[PREAMBLE_BYTES - 1 : PREAMBLE_BYTES] != b"\n":
        return None
    token = data[len(PREAMBLE_MAGIC) : PREAMBLE_BYTES - 1].decode("ascii", "replace")
    return token if is_token(token) else None


def is_token(token: object) -> bool:
    return isinstance(token, str) and len(token) == TOKEN_CHARS and set(token) <= _HEX


def attach_payload(relay_peer_id: str, node_peer_id: str, nonce: bytes) -> bytes:
    """What an attaching node signs: it asks this relay, now (the relay's fresh nonce), to relay for it."""
    return ATTACH_TAG + relay_peer_id.encode() + b"\n" + node_peer_id.encode() + b"\n" + nonce
