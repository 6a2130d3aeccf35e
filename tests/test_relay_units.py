"""The pure parts of relaying: ClientHello sniffing, the wire names, records that name relays,
the bandwidth meter, the client's choice of a peer's next address when one is down, and a
node's choice of relays by round trip."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from client.peers import DiscoveryOptions
from client.planner import ADDRESS_DOWN_S, REDIAL_S, Planner
from client.session import RemoteHop
from client.swarm import ClientConfig
from node.relay_config import RelayConfig, RelayTarget, relay_config_from_flags
from node.relaying import nearest_first
from node.splice import Meter
from swarm.client_hello import Kind, sniff
from swarm.errors import IdentityMismatch, PeerUnavailable, RecordRejected
from swarm.identity import Identity
from swarm.records import PeerRecord
from swarm.relay_wire import PREAMBLE_BYTES, data_preamble, new_token, parse_preamble, peer_of_sni, sni_name
from swarm.transport import Transport
from tests.nodes import free_port

NAME = sni_name("a" * 32)


def _client_hello(server_name: str | None, maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> bytes:
    """A real ClientHello from Python's ssl, read by a plain TCP listener."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def accept() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5)
        data = b""
        while sniff(data).kind is Kind.INCOMPLETE:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        got.append(data)
        conn.close()

    thread = threading.Thread(target=accept)
    thread.start()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.maximum_version = maximum
    with socket.create_connection(listener.getsockname()) as raw:
        try:
            context.wrap_socket(raw, server_hostname=server_name)
        except (ssl.SSLError, OSError):
            pass
    thread.join(10)
    listener.close()
    return got[0]


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_the_server_name_of_a_real_client_hello(maximum):
    hello = _client_hello(NAME, maximum)
    assert sniff(hello).kind is Kind.HELLO and sniff(hello).server_name == NAME
    assert peer_of_sni(sniff(hello).server_name) == "a" * 32


def test_every_truncation_is_incomplete_and_no_name_is_none():
    hello = _client_hello(NAME)
    assert all(sniff(hello[:cut]).kind is Kind.INCOMPLETE for cut in range(len(hello)))
    bare = _client_hello(None)
    assert sniff(bare).kind is Kind.HELLO and sniff(bare).server_name is None


def test_a_client_hello_split_over_two_records_is_read_whole():
    hello = _client_hello(NAME)
    body = hello[5:]
    first, second = body[:100], body[100:]
    split = b"\x16\x03\x01" + len(first).to_bytes(2, "big") + first + b"\x16\x03\x01" + len(second).to_bytes(2, "big") + second
    assert sniff(split).server_name == NAME


def test_what_is_not_a_client_hello():
    assert sniff(b"GET / HTTP/1.1\r\n\r\n").kind is Kind.NOT_TLS
    assert sniff(b"\x16\x03\x01\xff\xff").kind is Kind.NOT_TLS  # a record longer than TLS allows
    assert sniff(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00").kind is Kind.NOT_TLS  # a ServerHello
    assert sniff(data_preamble(new_token())).kind is Kind.NOT_TLS


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises(data):
    sniff(data)
    sniff(b"\x16\x03\x01" + data)
    sniff(b"\x16\x03\x01" + len(data).to_bytes(2, "big") + b"\x01" + data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2000), st.binary(min_size=1, max_size=8))
def test_a_mangled_real_hello_never_raises(at, junk):
    hello = bytearray(_HELLO)
    at %= len(hello)
    hello[at : at + len(junk)] = junk
    result = sniff(bytes(hello))
    assert result.server_name is None or result.server_name.isprintable()


_HELLO = _client_hello(NAME)


def test_names_and_preambles():
    peer = Identity.generate().peer_id
    assert peer_of_sni(sni_name(peer)) == peer
    assert peer_of_sni(sni_name(peer).upper()) == peer, "server names are case-insensitive"
    assert peer_of_sni("example.com") is None and peer_of_sni(None) is None and peer_of_sni("x.layerswarm") is None
    token = new_token()
    assert len(data_preamble(token)) == PREAMBLE_BYTES and parse_preamble(data_preamble(token)) == token
    assert parse_preamble(b"LSRELAY1 " + b"Z" * 32 + b"\n") is None and parse_preamble(data_preamble(token)[:-1]) is None
    with pytest.raises(ValueError):
        data_preamble("not a token")


# --- records, config ------------------------------------------------------------------------------


def _record(**flags) -> PeerRecord:
    return PeerRecord.create(Identity.generate(), addresses=["https://10.0.0.1:7000", "https://10.0.0.2:7000"], now=time.time(), ttl=60, **flags)


def test_records_carry_relayed_and_offers_relay_only_when_true():
    plain = _record()
    assert "relayed" not in plain.to_wire() and "offers_relay" not in plain.to_wire()
    relayed = PeerRecord.from_bytes(_record(relayed=True).to_bytes())
    assert relayed.relayed and relayed.to_wire()["relayed"] is True
    wire = _record(offers_relay=True).to_wire()
    wire["offers_relay"] = False
    with pytest.raises(RecordRejected):
        PeerRecord.from_wire(wire)
    with pytest.raises(RecordRejected):
        _record(relayed=True, offers_relay=True)


def test_relay_flags():
    assert relay_config_from_flags([], False, 2, 16, 32, 1 << 20).mode == "auto"
    assert relay_config_from_flags(["https://r:1", "https://q:2"], True, 2, 0, 32, 1 << 20).urls == ("https://r:1", "https://q:2")
    with pytest.raises(ValueError):
        relay_config_from_flags(["auto", "https://r:1"], False, 2, 16, 32, 1 << 20)
    with pytest.raises(ValueError):
        RelayConfig(mode="urls")


def test_the_meter_waits_out_a_burst():
    now = [0.0]
    meter = Meter(1000, clock=lambda: now[0])
    assert meter.take(1000) == 0.0
    assert meter.take(500) == pytest.approx(0.5)
    now[0] += 1.0
    assert meter.take(100) == 0.0 and meter.total == 1600


# --- the client: a peer's next address ----------------------------------------------------------


def test_a_peer_down_at_one_address_is_tried_at_its_next_and_the_address_is_down_for_all():
    clock = [1000.0]
    planner = Planner("d", 30, DiscoveryOptions(), ClientConfig(transport=Transport()), clock=lambda: clock[0])
    identity = Identity.generate()
    record = PeerRecord.create(identity, addresses=["https://10.0.0.1:7000", "https://10.0.0.2:7000"], now=time.time(), ttl=60, relayed=True)
    assert planner.view.table.merge(record, time.time(), source="bootstrap")
    assert planner.address(record) == "https://10.0.0.1:7000"
    error = PeerUnavailable("cannot reach it")
    error.hop = RemoteHop("https://10.0.0.1:7000", 0, 30, identity.peer_id)
    assert planner.readdress(error), "a peer with another address is not routed around"
    assert planner.address(record) == "https://10.0.0.2:7000"
    error.hop = RemoteHop("https://10.0.0.2:7000", 0, 30, identity.peer_id)
    clock[0] += REDIAL_S
    assert planner.readdress(error), "the other address failed before: worth a new try (max_attempts bounds this)"
    assert planner.address(record) == "https://10.0.0.1:7000"
    clock[0] += ADDRESS_DOWN_S + 1
    mismatch = IdentityMismatch("someone else")
    mismatch.hop = error.hop
    assert not planner.readdress(mismatch), "misbehaviour is never an address problem"


async def test_auto_relays_are_chosen_nearest_first_and_a_wrong_or_silent_one_is_left_out():
    """`nearest_first` on real TLS servers with their own identities: a peer answering /info in 40 ms
    comes after one answering at once; one whose certificate is another key's (the pin fails) and
    one where nobody listens are left out; candidates beyond the probed ones follow unprobed."""
    transport = Transport()
    identities = [Identity.generate() for _ in range(3)]
    async with _info_servers(transport, zip(identities, [0.04, 0.0, 0.0])) as urls:
        slow = RelayTarget(identities[0].peer_id, urls[0])
        fast = RelayTarget(identities[1].peer_id, urls[1])
        impostor = RelayTarget(Identity.generate().peer_id, urls[2])  # the server there holds another key
        silent = RelayTarget(Identity.generate().peer_id, f"https://127.0.0.1:{free_port()}")
        unprobed = RelayTarget(Identity.generate().peer_id, "https://127.0.0.1:1")
        chosen = await nearest_first(transport, [slow, impostor, silent, fast, unprobed], probed=4)
        assert chosen == [fast, slow, unprobed]


@contextlib.asynccontextmanager
async def _info_servers(transport: Transport, servers):
    """Real TLS servers, one per (identity, delay): each presents the identity's certificate and
    answers `GET /info` after its delay. Yields their URLs."""
    runners = []
    try:
        for identity, delay in servers:

            async def info(request: web.Request, delay: float = delay) -> web.Response:
                await asyncio.sleep(delay)
                return web.json_response({})

            app = web.Application()
            app.router.add_get("/info", info)
            runner = web.AppRunner(app, access_log=None)
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=transport.server_ssl(identity)).start()
        yield [f"https://127.0.0.1:{runner.addresses[0][1]}" for runner in runners]
    finally:
        for runner in runners:
            await runner.cleanup()


def test_a_dial_back_goes_to_the_v4_form_of_a_mapped_source_and_never_to_a_link_local_one():
    from node.reachability import _dial_host
    from swarm.errors import BadRequest

    assert _dial_host("::ffff:203.0.113.7") == "203.0.113.7"
    assert _dial_host("203.0.113.7") == "203.0.113.7"
    assert _dial_host("2001:db8::5") == "2001:db8::5"
    for bad in ("fe80::1", "fe80::1%eth0", "169.254.10.1", "", None, "not an address"):
        with pytest.raises(BadRequest):
            _dial_host(bad)


async def test_the_client_dials_the_nearest_of_a_peers_addresses(monkeypatch):
    """A relayed peer named at two addresses (two servers with the peer's own key, real TLS): the
    planner measures both and dials the one answering at once, not the first listed, which
    answers /info 40 ms late; with that one down it dials the other."""
    import client.planner as planner_module

    model = {"architecture": "llama", "shape": "L30-d576-ff1536-h9-kv3-v49152", "digest": "0123456789abcdef" * 2}
    transport = Transport()
    identity = Identity.generate()

    async def no_discovery(http, options, view, transport):  # the view is filled below, by hand
        return view

    monkeypatch.setattr(planner_module, "discover", no_discovery)
    async with _info_servers(transport, [(identity, 0.04), (identity, 0.0)]) as (slow, fast):
        planner = Planner(model["digest"], 30, DiscoveryOptions(), ClientConfig(transport=transport))
        record = PeerRecord.create(identity, addresses=[slow, fast], now=time.time(), ttl=60, model=model, num_layers=30, span=(0, 30), relayed=True)
        assert planner.view.table.merge(record, time.time(), source="bootstrap")
        assert planner.address(record) == slow, "unmeasured: the record's order"
        async with transport.client_session() as http:
            await planner.refresh(http, force=True)
        assert planner.address(record) == fast
        assert planner.measurements.rtt(identity.peer_id) < 0.04, "the peer's round trip is its nearest address's"
        error = PeerUnavailable("cannot reach it")
        error.hop = RemoteHop(fast, 0, 30, identity.peer_id)
        assert planner.readdress(error) and planner.address(record) == slow
