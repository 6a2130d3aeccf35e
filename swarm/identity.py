"""Ed25519 node identity: the key a node keeps on disk, its peer id, signing and verifying.

A node signs what it says about itself (its PeerRecord) so that gossip can carry the
record through any number of untrusted peers: a relay can drop a record but not change
it. The peer id is a hash of the public key, so an id cannot be claimed without the key.

The key file is PEM (PKCS#8, unencrypted), readable by `openssl pkey`, created with
0600 permissions on first use. Nothing here logs or prints key material.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from swarm.errors import KeyFileError

log = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32  # raw Ed25519 public key
SIGNATURE_BYTES = 64  # raw Ed25519 signature
PEER_ID_HASH_BYTES = 20  # sha256(public key) truncated: 160 bits, 32 base32 characters
PEER_ID_CHARS = 32
PEER_ID_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")  # RFC 4648 base32, lowercased

_MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM Ed25519 key is ~120 bytes; refuse to read anything huge


def peer_id_from_public_key(public_key: bytes) -> str:
    """The peer id of a raw 32-byte public key: base32 (lowercase, no padding) of sha256[:20]."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} raw bytes")
    digest = hashlib.sha256(public_key).digest()[:PEER_ID_HASH_BYTES]
    return base64.b32encode(digest).decode("ascii").lower()  # 20 bytes -> exactly 32 chars, no '='


def is_peer_id(text: object) -> bool:
    """Whether `text` has the shape of a peer id (it may still belong to no key anyone holds)."""
    return isinstance(text, str) and len(text) == PEER_ID_CHARS and set(text) <= PEER_ID_ALPHABET


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether `signature` is `public_key`'s Ed25519 signature of `message`.

    Never raises: keys, signatures and messages come from the network, and any garbage
    (wrong type, wrong length, a key that is not a curve point) is simply `False`.
    """
    if not (isinstance(public_key, bytes) and isinstance(signature, bytes) and isinstance(message, bytes)):
        return False
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """A node's Ed25519 key pair. Holds the private key; its repr shows only the peer id."""

    __slots__ = ("_private_key", "public_key_bytes", "peer_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key_bytes: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )  # 32 bytes
        self.peer_id: str = peer_id_from_public_key(self.public_key_bytes)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r})"

    @classmethod
    def generate(cls) -> Identity:
        """A fresh key that lives only in memory (tests, throwaway clients)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        """The identity kept at `path`; on first use a new key is written there (0600, dirs made).

        A file that exists but holds no readable Ed25519 key is a `KeyFileError`, never
        silently replaced: the peer id is the node's name in the swarm.
        """
        path = Path(path).expanduser()
        if not path.exists():
            _create_key_file(path)
        return cls(_read_key_file(path))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return self._private_key.sign(message)

    def private_key_pem_for_tls(self) -> bytes:
        """The private key as PEM (PKCS#8), for swarm/transport.py alone: the TLS certificate carries
        this identity key, and OpenSSL loads a server's key only from a file. Nothing else may call it."""
        return self._private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _create_key_file(path: Path) -> None:
    """Write a new key to `path` unless someone else does first.

    The key goes to a private temporary file that is then hard-linked into place, so the
    path never holds a half-written key and two nodes starting at once share one identity.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
    except OSError as error:
        raise KeyFileError(f"cannot create key file {path}: {error.strerror or error}") from error
    finally:
        temporary.unlink(missing_ok=True)
    log.info("created a new node key at %s", path)


def _read_key_file(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        if stat.S_IMODE(mode) & 0o077:
            log.warning("key file %s is readable by others (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
        with path.open("rb") as file:
            data = file.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as error:
        raise KeyFileError(f"cannot read key file {path}: {error.strerror or error}") from error
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is too large to be an Ed25519 key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message may quote the file; say only what is wrong with it.
        raise KeyFileError(
            f"key file {path} does not hold an unencrypted PEM private key; "
            "fix it or delete it to make a new identity (a new peer id)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
    return key
