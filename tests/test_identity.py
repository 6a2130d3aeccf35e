"""Node identity: key files on disk, peer ids, signatures."""

from __future__ import annotations

import logging
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from swarm.errors import KeyFileError, SwarmError
from swarm.identity import PEER_ID_ALPHABET, PEER_ID_CHARS, Identity, is_peer_id, peer_id_from_public_key, verify


def test_generate_gives_a_peer_id_derived_from_the_public_key() -> None:
    identity = Identity.generate()
    assert len(identity.public_key_bytes) == 32
    assert identity.peer_id == peer_id_from_public_key(identity.public_key_bytes)
    assert len(identity.peer_id) == PEER_ID_CHARS and set(identity.peer_id) <= PEER_ID_ALPHABET
    assert is_peer_id(identity.peer_id)
    assert Identity.generate().peer_id != identity.peer_id


def test_peer_id_is_stable_for_a_known_key() -> None:
    # sha256(32 zero bytes)[:20] in lowercase base32 (from coreutils: sha256sum | xxd -r -p | base32),
    # pinned because peer ids are names on the wire.
    assert peer_id_from_public_key(bytes(32)) == "mzuhvlpymk6xo3epygfy5h4oeaejofef"


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), "a" * 32, None])
def test_peer_id_of_a_non_key_is_a_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        peer_id_from_public_key(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "A" * 32, "1" * 32, "a" * 31, "a" * 33, None, 7])
def test_is_peer_id_refuses_other_shapes(text: object) -> None:
    assert not is_peer_id(text)


def test_load_or_create_writes_a_private_key_file_once(tmp_path) -> None:
    path = tmp_path / "deep" / "er" / "node.key"
    first = Identity.load_or_create(path)
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temporary left behind

    second = Identity.load_or_create(path)
    assert second.peer_id == first.peer_id
    assert second.public_key_bytes == first.public_key_bytes
    assert verify(first.public_key_bytes, second.sign(b"hello"), b"hello")


def test_key_file_is_readable_by_the_standard_library_tools(tmp_path) -> None:
    path = tmp_path / "node.key"
    identity = Identity.load_or_create(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw == identity.public_key_bytes


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a key at all",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        bytes(range(256)),
        b"x" * (100 * 1024),
    ],
)
def test_corrupt_key_file_is_a_key_file_error(tmp_path, content: bytes) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match="node.key") as caught:
        Identity.load_or_create(path)
    assert isinstance(caught.value, SwarmError)
    assert path.read_bytes() == content  # never silently replaced


def test_key_of_another_algorithm_is_a_key_file_error(tmp_path) -> None:
    path = tmp_path / "node.key"
    other = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(other)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        Identity.load_or_create(path)


def test_a_directory_in_place_of_the_key_is_a_key_file_error(tmp_path) -> None:
    path = tmp_path / "node.key"
    path.mkdir()
    with pytest.raises(KeyFileError):
        Identity.load_or_create(path)


def test_loose_permissions_warn_but_load(tmp_path, caplog) -> None:
    path = tmp_path / "node.key"
    identity = Identity.load_or_create(path)
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="swarm.identity"):
        assert Identity.load_or_create(path).peer_id == identity.peer_id
    assert "chmod 600" in caplog.text


def test_repr_and_logs_carry_no_key_material(tmp_path, caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="swarm.identity"):
        identity = Identity.load_or_create(tmp_path / "node.key")
    pem = (tmp_path / "node.key").read_text()
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    assert body not in caplog.text and body not in repr(identity)
    assert identity.peer_id in repr(identity)
    assert identity.public_key_bytes.hex() not in repr(identity)


def test_sign_and_verify() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"message")
    assert len(signature) == 64
    assert verify(identity.public_key_bytes, signature, b"message")
    assert not verify(identity.public_key_bytes, signature, b"messagE")
    assert not verify(Identity.generate().public_key_bytes, signature, b"message")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify(identity.public_key_bytes, flipped, b"message")


@pytest.mark.parametrize(
    ("key", "signature", "message"),
    [
        (None, bytes(64), b"m"),
        (bytes(32), None, b"m"),
        (bytes(32), bytes(64), None),
        ("k" * 32, bytes(64), b"m"),
        (bytes(32), "s" * 64, b"m"),
        (bytes(31), bytes(64), b"m"),
        (bytes(32), bytes(63), b"m"),
        (bytes(32), bytes(64), b"m"),  # the all-zero key: a degenerate point
        (b"\xff" * 32, bytes(64), b"m"),  # not a curve point
        (bytearray(32), bytes(64), b"m"),
    ],
)
def test_verify_never_raises_on_garbage(key: object, signature: object, message: object) -> None:
    assert verify(key, signature, message) is False  # type: ignore[arg-type]
