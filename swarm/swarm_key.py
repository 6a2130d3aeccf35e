"""The secret of one private swarm: its file format, loading, writing, and MACs under it.

`swarm keygen > swarm.key` writes one; `--swarm-key FILE` reads it. The file is
one `swarm-key-v1:<64 hex digits>` line (with `#` comments), refused loudly when
missing, malformed, oversized or readable by group or others. How the key is
proved on the wire is swarm/membership.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from swarm.errors import KeyFileError

KEY_BYTES = 32
KEY_PREFIX = "swarm-key-v1:"
_MAX_KEY_FILE_BYTES = 4096
_FINGERPRINT_TAG = b"layerswarm/swarm-fingerprint/v1\n"


def fields(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different field lists give the same bytes."""
    return b"".join(len(part).to_bytes(4, "big") + part for part in parts)


class SwarmKey:
    """The secret of one private swarm. Its repr shows only a fingerprint; it is never logged."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
            raise ValueError(f"a swarm key is {KEY_BYTES} bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return f"SwarmKey(fingerprint={self.fingerprint!r})"

    @classmethod
    def generate(cls) -> SwarmKey:
        return cls(os.urandom(KEY_BYTES))

    @property
    def fingerprint(self) -> str:
        """A short name of the key, safe to show (it reveals nothing of the key): compare it across machines."""
        return self.mac(_FINGERPRINT_TAG)[:6].hex()

    def mac(self, tag: bytes, *parts: bytes) -> bytes:
        """HMAC-SHA256 under the key of `tag` and the length-prefixed `parts`."""
        return hmac.new(self._secret, tag + fields(*parts), hashlib.sha256).digest()

    def to_text(self) -> str:
        return (
            "# layerswarm swarm key: whoever holds this file can join the swarm. Keep it secret (chmod 600).\n"
            f"# fingerprint {self.fingerprint}\n"
            f"{KEY_PREFIX}{self._secret.hex()}\n"
        )

    @classmethod
    def from_text(cls, text: str, source: str = "swarm key") -> SwarmKey:
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if len(lines) != 1 or not lines[0].startswith(KEY_PREFIX):
            raise KeyFileError(f"{source} does not hold one '{KEY_PREFIX}...' line: make one with `swarm keygen > FILE`")
        digits = lines[0][len(KEY_PREFIX) :]
        try:
            secret = bytes.fromhex(digits)
        except ValueError:
            secret = b""
        if len(secret) != KEY_BYTES or len(digits) != 2 * KEY_BYTES:
            raise KeyFileError(f"{source}: a swarm key is {2 * KEY_BYTES} hex digits after '{KEY_PREFIX}'")
        return cls(secret)

    @classmethod
    def load(cls, path: str | Path) -> SwarmKey:
        """The key in `path`; a missing, oversized, malformed or group/world-readable file is a `KeyFileError`."""
        path = Path(path).expanduser()
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise KeyFileError(f"swarm key file {path} is open to others (mode {mode:o}): chmod 600 {path}")
            with path.open("rb") as file:
                data = file.read(_MAX_KEY_FILE_BYTES + 1)
        except OSError as error:
            raise KeyFileError(f"cannot read swarm key file {path}: {error.strerror or error} (make one with `swarm keygen > FILE`)") from None
        if len(data) > _MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"swarm key file {path} is too large to be a swarm key")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise KeyFileError(f"swarm key file {path} is not text") from None
        return cls.from_text(text, f"swarm key file {path}")

    def write(self, path: str | Path) -> None:
        """Write a new key file (0600); an existing file is never overwritten."""
        path = Path(path).expanduser()
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(self.to_text())
        except OSError as error:
            raise KeyFileError(f"cannot write swarm key file {path}: {error.strerror or error}") from None
