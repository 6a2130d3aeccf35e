"""swarm/client_hello.py: the server name of a ClientHello, from real Python ssl handshakes and from garbage."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.client_hello import MAX_HELLO_BYTES, Kind, Sniff, sniff
from swarm.identity import Identity
from swarm.relay_wire import PREAMBLE_MAGIC, data_preamble, new_token, peer_of_sni, sni_name

PEER = Identity.generate().peer_id


def client_hello(server_name: str | None, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> bytes:
    """The first bytes Python's ssl sends as a client: one real ClientHello."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, sizes: list[int]) -> bytes:
    """The same handshake message carried in several TLS records of the given sizes (the last takes the rest)."""
    assert hello[0] == 0x16
    length = int.from_bytes(hello[3:5], "big")
    message, version = hello[5 : 5 + length], hello[1:3]
    records, at = [], 0
    for size in sizes:
        if at >= len(message):
            break
        chunk = message[at : at + max(1, size)]
        records.append(b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk)
        at += len(chunk)
    if at < len(message):
        records.append(b"\x16" + version + (len(message) - at).to_bytes(2, "big") + message[at:])
    return b"".join(records)


HELLOS = {
    "tls13 sni": (client_hello(sni_name(PEER)), sni_name(PEER)),
    "tls12 sni": (client_hello("example.org", ssl.TLSVersion.TLSv1_2), "example.org"),
    "tls13 none": (client_hello(None), None),
    "tls12 none": (client_hello(None, ssl.TLSVersion.TLSv1_2), None),
}


@pytest.mark.parametrize("name", HELLOS)
def test_real_client_hellos(name):
    hello, server_name = HELLOS[name]
    assert sniff(hello) == Sniff(Kind.HELLO, server_name)
    assert sniff(hello + b"\x17\x03\x03 trailing bytes") == Sniff(Kind.HELLO, server_name)


def test_the_pinned_sni_names_the_peer():
    hello, _ = HELLOS["tls13 sni"]
    assert peer_of_sni(sniff(hello).server_name) == PEER
    assert peer_of_sni(sniff(HELLOS["tls12 sni"][0]).server_name) is None


@pytest.mark.parametrize("name", HELLOS)
def test_every_truncation_is_incomplete(name):
    hello, _ = HELLOS[name]
    for cut in range(len(hello)):
        assert sniff(hello[:cut]).kind is Kind.INCOMPLETE, cut


@pytest.mark.parametrize("name", HELLOS)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 200])
def test_a_hello_split_over_records(name, size):
    hello, server_name = HELLOS[name]
    split = refragment(hello, [size] * 10_000)
    assert len(split) == len(hello) + 5 * (-(-(len(hello) - 5) // size) - 1)  # one 5-byte header per record
    assert sniff(split) == Sniff(Kind.HELLO, server_name)
    for cut in range(0, len(split), 7):
        assert sniff(split[:cut]).kind is Kind.INCOMPLETE


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(HELLOS)), st.lists(st.integers(1, 300), max_size=40))
def test_any_fragmentation_reads_the_same_name(name, sizes):
    hello, server_name = HELLOS[name]
    assert sniff(refragment(hello, sizes)) == Sniff(Kind.HELLO, server_name)


def test_oversized_lengths_are_not_tls():
    hello, _ = HELLOS["tls13 sni"]
    big_record = hello[:3] + (16384 + 2049).to_bytes(2, "big") + hello[5:]
    assert sniff(big_record).kind is Kind.NOT_TLS
    big_body = hello[:6] + (MAX_HELLO_BYTES).to_bytes(3, "big") + hello[9:]
    assert sniff(big_body).kind is Kind.NOT_TLS
    assert sniff(hello[:3] + b"\x00\x00" + hello[5:]).kind is Kind.NOT_TLS  # an empty record
    # a stream of tiny records that never completes the message is cut off, not waited for forever
    assert sniff((b"\x16\x03\x01\x00\x01\x01") * (MAX_HELLO_BYTES // 6 + 10)).kind is Kind.NOT_TLS
    # lengths inside the hello that run past its end
    inner = bytearray(hello)
    inner[9 + 2 + 32] = 0xFF  # session id length
    assert sniff(bytes(inner)).kind is Kind.NOT_TLS


def test_other_protocols_are_not_tls():
    assert sniff(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").kind is Kind.NOT_TLS
    assert sniff(b"CONNECT evil:443 HTTP/1.1\r\n\r\n").kind is Kind.NOT_TLS
    assert sniff(data_preamble(new_token())).kind is Kind.NOT_TLS
    assert sniff(PREAMBLE_MAGIC).kind is Kind.NOT_TLS
    assert sniff(b"\x17\x03\x03\x00\x05hello").kind is Kind.NOT_TLS  # application data, not a handshake
    assert sniff(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00").kind is Kind.NOT_TLS  # a ServerHello


def test_a_first_byte_that_is_not_a_handshake_is_not_tls_at_once():
    for first in (b"G", b"L", b"\x00", b"\x80"):
        assert sniff(first).kind is Kind.NOT_TLS


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=4096))
def test_garbage_never_raises_nor_names(data):
    result = sniff(data)
    assert result.kind in (Kind.INCOMPLETE, Kind.NOT_TLS)
    assert result.server_name is None


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(sorted(HELLOS)), st.integers(0, 4095), st.integers(0, 255))
def test_a_flipped_byte_never_raises(name, where, value):
    hello = bytearray(HELLOS[name][0])
    hello[where % len(hello)] = value
    result = sniff(bytes(hello))
    assert isinstance(result, Sniff)
    if result.kind is Kind.HELLO and result.server_name is not None:
        assert result.server_name.isprintable() and len(result.server_name) <= 253
