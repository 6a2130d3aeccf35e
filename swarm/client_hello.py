"""The server name (SNI) of a TLS ClientHello, read from the first bytes of a connection.

A relay (node/relay_host.py) reads it before doing any TLS of its own, to decide whether
the connection is for itself or for a node it relays for; the bytes are only looked at,
never consumed (the caller peeks), so either side can then run the handshake itself.

Pure and defensive: the bytes come from a stranger. A ClientHello may span several TLS
records; at most `MAX_HELLO_BYTES` are ever considered.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_HELLO_BYTES = 16 * 1024  # a ClientHello with post-quantum key shares is ~2 KiB; more is not worth waiting for
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_HOST_NAME = 0x00


class Kind(enum.Enum):
    INCOMPLETE = "incomplete"  # a ClientHello so far: wait for more bytes
    NOT_TLS = "not_tls"  # not a TLS handshake record (or a malformed one)
    HELLO = "hello"  # a whole ClientHello: `server_name` is its SNI host name, or None


@dataclass(frozen=True)
class Sniff:
    kind: Kind
    server_name: str | None = None


def sniff(data: bytes) -> Sniff:
    """What `data`, the first bytes a client sent, says about its TLS ClientHello."""
    handshake = bytearray()
    offset = 0
    while True:
        header = data[offset : offset + 5]
        # judge what has come of the header at once: a plain-HTTP or preamble first byte is not TLS
        # even alone, so the caller need not wait for more bytes that may never come
        if (header[:1] and header[0] != _HANDSHAKE) or (header[1:2] and header[1] != 0x03):
            return Sniff(Kind.NOT_TLS)
        if len(header) < 5:
            return _incomplete(offset + 5)
        length = int.from_bytes(data[offset + 3 : offset + 5], "big")
        if length == 0 or length > 16384 + 2048:
            return Sniff(Kind.NOT_TLS)
        end = offset + 5 + length
        if end > len(data):
            return _incomplete(end)
        handshake += data[offset + 5 : end]
        offset = end
        if len(handshake) >= 4:
            if handshake[0] != _CLIENT_HELLO:
                return Sniff(Kind.NOT_TLS)
            body_length = int.from_bytes(handshake[1:4], "big")
            if 4 + body_length > MAX_HELLO_BYTES:
                return Sniff(Kind.NOT_TLS)
            if len(handshake) >= 4 + body_length:
                name = _server_name(bytes(handshake[4 : 4 + body_length]))
                return Sniff(Kind.NOT_TLS) if name is _MALFORMED else Sniff(Kind.HELLO, name)  # type: ignore[arg-type]
        if offset > MAX_HELLO_BYTES:
            return Sniff(Kind.NOT_TLS)


def _incomplete(needed: int) -> Sniff:
    return Sniff(Kind.INCOMPLETE) if needed <= MAX_HELLO_BYTES + 5 else Sniff(Kind.NOT_TLS)


_MALFORMED = object()


def _server_name(body: bytes) -> str | None | object:
    """The host name in a ClientHello body; None without SNI; `_MALFORMED` for a broken body."""
    reader = _Reader(body)
    try:
        reader.take(2 + 32)  # legacy version, random
        session_id = reader.int(1)
        if session_id > 32:  # RFC 8446 4.1.2: 0..32 bytes
            return _MALFORMED
        reader.take(session_id)
        suites = reader.int(2)
        if suites < 2 or suites % 2:
            return _MALFORMED
        reader.take(suites)
        compressions = reader.int(1)
        if compressions < 1:
            return _MALFORMED
        reader.take(compressions)
        if reader.left == 0:
            return None  # no extensions at all
        extensions = _Reader(reader.take(reader.int(2)))
        if reader.left:  # bytes after the extensions: the lengths disagree
            return _MALFORMED
        while extensions.left:
            kind, data = extensions.int(2), extensions.take(extensions.int(2))
            if kind != _SERVER_NAME:
                continue
            names = _Reader(data)
            names = _Reader(names.take(names.int(2)))
            while names.left:
                name_type, name = names.int(1), names.take(names.int(2))
                if name_type == _HOST_NAME:
                    text = name.decode("ascii")
                    return text if text and text.isprintable() and len(text) <= 253 else _MALFORMED
            return None
        return None
    except (IndexError, UnicodeDecodeError):
        return _MALFORMED


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.at

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise IndexError("past the end")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")
