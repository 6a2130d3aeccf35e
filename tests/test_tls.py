"""TLS pinned to identities (swarm/transport.py): the default path, tested over real sockets.

Pure parts first (the certificate, the pin), then loopback servers in this process (pinning,
plain http refused, handshakes counted per source and bounded), then real node processes
serving TLS: the same greedy text as a plain-http swarm; a man in the middle (a relay that
terminates TLS with its own certificate) at the address a node advertises is refused by the
client, which re-routes with unchanged text, and by a node pushing to it; an impostor (a raw
TCP relay at that address leading to another real node) is refused by both too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ssl
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from client.generate import LocalBlocks, stream_tokens_sync
from client.peers import DiscoveryOptions
from client.planner import ClientConfig, Planner
from client.sampling import SamplingParams
from client.session import RemoteHop, RouteSession, SessionConfig, hop_of
from node.accept import GuardedRunner
from node.limits import SourceLimit
from swarm.discovery.mdns import Advert, Mdns, MdnsConfig
from swarm.discovery.peers_http import fetch_peers
from swarm.errors import IdentityMismatch
from swarm.identity import Identity
from swarm.membership import open_server_middleware
from swarm.peers import PeerTable
from swarm.records import PeerRecord
from swarm.transport import PeerPin, PinMismatch, PlainHttpRefused, Transport, certificate_pem, peer_id_of_certificate
from tests.nodes import NodeProcess, free_port, reserve_url, start_nodes, stop_nodes, swarm_client

TLS = Transport()
PLAIN = Transport(insecure_http=True)
PROMPT = "What is the capital of France?"
NEW_TOKENS = 12
LOOPBACK = "127.0.0.1"


# --- pure parts ------------------------------------------------------------------------------


def test_the_certificate_carries_the_identity_key():
    me = Identity.generate()
    certificate = x509.load_pem_x509_certificate(certificate_pem(me))
    key = certificate.public_key()
    assert isinstance(key, Ed25519PublicKey)
    assert key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == me.public_key_bytes
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == me.peer_id
    key.verify(certificate.signature, certificate.tbs_certificate_bytes)  # self-signed by that key
    assert peer_id_of_certificate(certificate.public_bytes(serialization.Encoding.DER)) == me.peer_id


def test_only_an_ed25519_certificate_names_a_peer():
    assert peer_id_of_certificate(None) is None and peer_id_of_certificate(b"") is None
    assert peer_id_of_certificate(b"\x30\x03garbage") is None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")])
    now = datetime.datetime.now(datetime.timezone.utc)
    other = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    assert peer_id_of_certificate(other.public_bytes(serialization.Encoding.DER)) is None


@dataclass
class _Transport:
    """What `PeerPin.check` reads of an asyncio transport."""

    extra: dict

    def get_extra_info(self, name: str, default=None):
        return self.extra.get(name, default)


@dataclass
class _SslObject:
    der: bytes

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


def test_a_pin_checks_the_presented_key_and_never_passes_plain_http():
    alice, mallory = Identity.generate(), Identity.generate()
    der = x509.load_pem_x509_certificate(certificate_pem(alice)).public_bytes(serialization.Encoding.DER)
    tls = {"peername": (LOOPBACK, 1), "sslcontext": object(), "ssl_object": _SslObject(der)}
    PeerPin(alice.peer_id).check(_Transport(tls))
    with pytest.raises(PinMismatch) as refused:
        PeerPin(mallory.peer_id).check(_Transport(tls))
    assert refused.value.got_peer == alice.peer_id and refused.value.expected_peer == mallory.peer_id
    assert isinstance(refused.value, aiohttp.ServerFingerprintMismatch)  # aiohttp's connector handles it as its own
    with pytest.raises(PinMismatch) as plain:  # aiohttp's Fingerprint would pass this silently
        PeerPin(alice.peer_id).check(_Transport({"peername": (LOOPBACK, 1)}))
    assert plain.value.got_peer is None


def test_pins_are_equal_by_peer_id_so_pooled_connections_are_reused_only_for_that_peer():
    a, b = Identity.generate().peer_id, Identity.generate().peer_id
    assert PeerPin(a) == PeerPin(a) and hash(PeerPin(a)) == hash(PeerPin(a))
    assert PeerPin(a) != PeerPin(b)
    assert TLS.pin(a) == PeerPin(a) and TLS.pin(None) is False and TLS.pin("") is False


def test_what_a_transport_dials_and_serves():
    assert TLS.allows("https://10.0.0.1:7000") and not TLS.allows("http://10.0.0.1:7000")
    assert PLAIN.allows("https://10.0.0.1:7000") and PLAIN.allows("http://10.0.0.1:7000")
    assert not PLAIN.allows("ftp://10.0.0.1:7000")
    assert (TLS.scheme, PLAIN.scheme) == ("https", "http")
    assert PLAIN.server_ssl(Identity.generate()) is None
    context = TLS.server_ssl(Identity.generate())
    assert context is not None and context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert TLS.server_middlewares() == [open_server_middleware]  # an open node refuses membership proofs


def test_a_tls_planner_leaves_plain_http_peers_out_of_routes():
    """Records with http URLs are valid records; a TLS client just never routes (or dials) there."""
    digest = "ab" * 16
    model = {"architecture": "llama", "shape": "L2", "digest": digest}
    secure, plain = Identity.generate(), Identity.generate()
    now = time.time()
    for transport, expected in ((TLS, {secure.peer_id}), (PLAIN, {secure.peer_id, plain.peer_id})):
        planner = Planner(digest, 2, DiscoveryOptions(bootstrap=("https://127.0.0.1:1",)), ClientConfig(transport=transport))
        for identity, url in ((secure, "https://127.0.0.1:7001"), (plain, "http://127.0.0.1:7002")):
            record = PeerRecord.create(identity, addresses=[url], now=now, ttl=60.0, model=model, num_layers=2, span=(0, 2), throughput=10.0)
            assert planner.view.table.merge(record, now)
        assert {r.peer_id for r in planner.records()} == expected
        route = planner.plan()
        assert all(TLS.allows(h.url) or transport is PLAIN for h in planner.hops(route))
    assert planner.undialable == 0


# --- loopback servers in this process ----------------------------------------------------------


@contextlib.asynccontextmanager
async def tls_server(identity: Identity, limit: int = 0, handshake_timeout_s: float = 20.0) -> AsyncIterator[tuple[str, GuardedRunner]]:
    """A node-like server: `GuardedRunner` with TLS, as node/server.py builds it; yields its URL."""
    async def who(request: web.Request) -> web.Response:
        return web.json_response({"peer_id": identity.peer_id, "secure": request.secure})

    app = web.Application()
    app.add_routes([web.get("/who", who)])
    runner = GuardedRunner(app, SourceLimit(limit, "connections"), tls=TLS.server_ssl(identity), handshake_timeout_s=handshake_timeout_s, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        yield f"https://{LOOPBACK}:{runner.addresses[0][1]}", runner
    finally:
        await runner.cleanup()


async def test_a_pinned_dial_reaches_its_peer_and_refuses_another():
    alice, mallory = Identity.generate(), Identity.generate()
    async with tls_server(alice) as (url, _), TLS.client_session() as http:
        for _ in range(2):
            async with http.get(f"{url}/who", ssl=TLS.pin(alice.peer_id)) as response:
                assert await response.json() == {"peer_id": alice.peer_id, "secure": True}
        assert sum(len(c) for c in http.connector._conns.values()) == 1  # one pooled, pinned connection
        async with http.get(f"{url}/who") as response:  # unpinned (a bootstrap URL): encrypted, proves nothing
            assert response.status == 200
        with pytest.raises(PinMismatch, match=f"presented peer {alice.peer_id}, not peer {mallory.peer_id}"):
            async with http.get(f"{url}/who", ssl=TLS.pin(mallory.peer_id)):
                pass
        with pytest.raises(PinMismatch):
            await http.ws_connect(f"{url}/who", ssl=TLS.pin(mallory.peer_id))


async def test_a_node_speaks_tls_13_only():
    alice = Identity.generate()
    async with tls_server(alice) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection(LOOPBACK, port, ssl=old)
        plain_reader, plain_writer = await asyncio.open_connection(LOOPBACK, port)  # plain http to a TLS node
        plain_writer.write(b"GET /who HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(plain_reader.read(), 10) == b""  # no answer, just closed
        plain_writer.close()


async def test_a_tls_party_never_dials_plain_http():
    """The session of a TLS party refuses an http URL before connecting: the listener sees nothing."""
    accepted = asyncio.Event()
    server = await asyncio.start_server(lambda r, w: (accepted.set(), w.close()), LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with TLS.client_session() as http:
            with pytest.raises(PlainHttpRefused):
                await http.get(f"http://{LOOPBACK}:{port}/info", ssl=TLS.pin(Identity.generate().peer_id))
            with pytest.raises(PlainHttpRefused):
                await http.ws_connect(f"http://{LOOPBACK}:{port}/session")
        async with PLAIN.client_session() as http:  # the control: an insecure party does dial it
            with contextlib.suppress(aiohttp.ClientError):
                await http.get(f"http://{LOOPBACK}:{port}/info")
        await asyncio.wait_for(accepted.wait(), 10)
    finally:
        server.close()
        await server.wait_closed()


async def test_handshaking_connections_count_per_source_and_are_bounded_in_time():
    """Strangers who open TCP connections and never finish the TLS handshake hold their source's
    slots only until the handshake timeout; meanwhile that source gets no more (a closed socket)."""
    alice = Identity.generate()
    async with tls_server(alice, limit=2, handshake_timeout_s=1.0) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        stalled = [await asyncio.open_connection(LOOPBACK, port) for _ in range(2)]  # say nothing
        async with TLS.client_session() as http:
            with pytest.raises(aiohttp.ClientError):
                await http.get(f"{url}/who", ssl=TLS.pin(alice.peer_id))
            for reader, writer in stalled:  # the node closes them at its handshake timeout
                assert await asyncio.wait_for(reader.read(), 10) == b""
                writer.close()
            async with http.get(f"{url}/who", ssl=TLS.pin(alice.peer_id)) as response:
                assert (await response.json())["peer_id"] == alice.peer_id


async def test_mdns_over_tls_fetches_only_from_the_advertised_identity():
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    table = PeerTable()
    browse = MdnsConfig(interfaces=[LOOPBACK], advertise=False, ttl_s=4, sweep_interval_s=1.0, probe_timeout_ms=1000)
    advertise = MdnsConfig(interfaces=[LOOPBACK], browse=False, ttl_s=4)
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for identity, presenting in ((alice, alice), (bob, mallory)):  # bob's address presents mallory's key
            app = web.Application()
            runner = web.AppRunner(app)
            body: dict[str, str] = {}
            app.router.add_get("/info", _serving(body))
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, LOOPBACK, 0, ssl_context=TLS.server_ssl(presenting)).start()
            port = runner.addresses[0][1]
            record = PeerRecord.create(identity, addresses=[f"https://{LOOPBACK}:{port}"], now=time.time(), ttl=60.0)
            body["record"] = base64.b64encode(record.to_bytes()).decode()
            servers[identity.peer_id] = port
        browser = await stack.enter_async_context(Mdns(browse, table=table, transport=TLS))
        for identity in (alice, bob):
            await stack.enter_async_context(Mdns(advertise, advert=Advert(identity.peer_id, servers[identity.peer_id])))
        deadline = time.monotonic() + 20
        while not (alice.peer_id in table and browser.failures["identity_mismatch"]):
            assert time.monotonic() < deadline, (dict(browser.failures), len(table))
            await asyncio.sleep(0.05)
        assert bob.peer_id not in table


def _serving(body: dict[str, str]):
    async def info(request: web.Request) -> web.Response:
        return web.json_response(body)

    return info


# --- real nodes ----------------------------------------------------------------------------


class Relay:
    """A TCP relay at the address a node advertises, on a loop of its own (node processes dial it
    too, across tests). It forwards raw bytes to `target`, except that connections from the
    sources in `attacked` meet `attack`: ("mitm", node), a man in the middle who terminates TLS
    with his own certificate and talks TLS on to that node; or ("impostor", node), raw bytes to
    another node than the one whose address this is."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay", daemon=True)
        self.target: tuple[str, int] | None = None
        self.attack: tuple[str, tuple[str, int]] | None = None
        self.attacked: frozenset[str] = frozenset()
        self.seen: Counter[str] = Counter()  # connections by what they met: "relayed", "mitm", "impostor"
        self._links: dict[asyncio.StreamWriter, asyncio.Event] = {}  # upstream writer -> set when the link is gone
        self._own_cert = TLS.server_ssl(Identity.generate())
        self._upstream = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._upstream.check_hostname, self._upstream.verify_mode = False, ssl.CERT_NONE
        self._server: asyncio.Server | None = None
        self.port = 0

    def __enter__(self) -> Relay:
        self.thread.start()
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, LOOPBACK, 0), self.loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def set(self, target: NodeProcess, attack: tuple[str, NodeProcess] | None = None, on: frozenset[str] = frozenset({LOOPBACK})) -> None:
        """Relay to `target`, with `attack` for sources in `on`. Links already open are ended first
        (and their diallers have closed their side when this returns), so pooled connections that
        were relayed untouched must dial again, into the attack."""
        self.target = _address_of(target)
        self.attack = None if attack is None else (attack[0], _address_of(attack[1]))
        self.attacked = on
        asyncio.run_coroutine_threadsafe(self._reset(), self.loop).result(60)

    async def _reset(self) -> None:
        """End every link: an EOF to the far node, whose TLS close (relayed) the dialler answers at once."""
        gone = list(self._links.values())
        for upstream in list(self._links):
            if upstream.can_write_eof():
                upstream.write_eof()
            else:  # the man in the middle's own TLS to the node
                upstream.close()
        if gone:
            await asyncio.wait([asyncio.ensure_future(event.wait()) for event in gone], timeout=5)  # a dialler that leaked its socket (a refused pin) never closes it

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        mode, to = self.attack if self.attack is not None and source in self.attacked else ("relayed", self.target)
        gone = asyncio.Event()
        try:
            if to is None:
                return
            self.seen[mode] += 1
            if mode == "mitm":
                await writer.start_tls(self._own_cert)
                up_reader, up_writer = await asyncio.open_connection(*to, ssl=self._upstream)
            else:
                up_reader, up_writer = await asyncio.open_connection(*to)
            self._links[up_writer] = gone
            try:
                await _splice(reader, writer, up_reader, up_writer)
            finally:
                del self._links[up_writer]
                up_writer.close()
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()
            gone.set()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError, ssl.SSLError, RuntimeError):  # RuntimeError: written after an EOF
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()


async def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
    """Both directions until the dialler is done. When the far side ends first, the dialler gets an
    EOF (where its transport can take one) and the link lasts until the dialler closes its side too."""
    to_far = asyncio.ensure_future(_copy(reader, up_writer))
    to_dialler = asyncio.ensure_future(_copy(up_reader, writer))
    try:
        await asyncio.wait({to_far, to_dialler}, return_when=asyncio.FIRST_COMPLETED)
        if not to_far.done() and writer.can_write_eof():
            writer.write_eof()
            await asyncio.wait_for(to_far, 30)
    finally:
        to_far.cancel()
        to_dialler.cancel()


_REAL_PORTS: dict[str, int] = {}  # peer id -> the port a node really listens on (its URL may be the relay's)


def _address_of(node: NodeProcess | tuple[str, int]) -> tuple[str, int]:
    if isinstance(node, tuple):
        return node
    return LOOPBACK, _REAL_PORTS.get(node.peer_id) or int(node.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def tls_swarm(tmp_path_factory):
    """bootstrap, A [0:10), B [10:20) advertised at the relay, B2 [10:20), C [20:30): all TLS.
    The relay starts as a plain forwarder to B, so B is proven (through it) like any node."""
    tmp = tmp_path_factory.mktemp("tls")
    period = ["--gossip-period", "0.5"]
    with Relay() as relay:
        bootstrap_port, bootstrap_url = reserve_url(tls=True)
        b_port = free_port()
        specs = [
            ["--no-model", *bootstrap_port, *period],
            ["--blocks", "0:10", "--bootstrap", bootstrap_url, *period],
            ["--blocks", "10:20", "--bootstrap", bootstrap_url, "--port", str(b_port), "--public-url", relay.url, *period],
            ["--blocks", "10:20", "--bootstrap", bootstrap_url, *period],
            ["--blocks", "20:30", "--bootstrap", bootstrap_url, *period],
        ]
        relay.target = (LOOPBACK, b_port)  # before B starts: B proves its address through the relay
        bootstrap, *nodes = start_nodes(specs, tmp, tls=True)  # all at once (tests/nodes.py `reserve_url`)
        _REAL_PORTS[nodes[1].peer_id] = b_port
        try:
            yield bootstrap, nodes, relay
        finally:
            stop_nodes([bootstrap, *nodes])


@pytest.fixture
def relay(tls_swarm):
    """The relay, set back to a plain forwarder to B after each test."""
    _, nodes, relay = tls_swarm
    relay.set(nodes[1])
    relay.seen.clear()
    yield relay
    relay.set(nodes[1])


@pytest.fixture(scope="module")
def plain_text(head, full_span) -> str:
    """The greedy text of the model run locally, which a plain-http swarm's equals (tests/test_client.py)."""
    ids = head.encode_prompt(PROMPT, chat=True)
    return "".join(t.text for t in stream_tokens_sync(head, LocalBlocks(full_span, len(ids) + NEW_TOKENS), ids, SamplingParams(max_new_tokens=NEW_TOKENS)))


async def _listed(bootstrap: NodeProcess, peer_ids: set[str], timeout: float = 60.0) -> None:
    """Until the bootstrap peer lists (has proven) every one of `peer_ids`."""
    deadline = time.monotonic() + timeout
    async with TLS.client_session() as http:
        while not peer_ids <= {r.peer_id for r in await fetch_peers(http, bootstrap.url, 5.0)}:
            assert time.monotonic() < deadline, "not every node was listed in time"
            await asyncio.sleep(0.2)  # another process's table: nothing to await but its answer


async def _client_routed_through_b(tls_swarm):
    """A TLS client whose view holds B (at the relay) and a planned route A -> B -> C.

    B's record comes from B itself (pinned, through the relay while it relays untouched): after
    an earlier test's attack, the bootstrap peer may have dropped B and barred its address for a
    while (a failed proof), which is what it should do."""
    bootstrap, nodes, relay = tls_swarm
    await _listed(bootstrap, {nodes[0].peer_id, nodes[2].peer_id, nodes[3].peer_id})
    client = swarm_client(bootstrap.url, tls=True)
    async with client.config.transport.client_session() as http:
        await client.refresh(http, force=True)
        async with http.get(f"{relay.url}/info", ssl=TLS.pin(nodes[1].peer_id)) as response:
            record = PeerRecord.from_bytes(base64.b64decode((await response.json())["record"]))
    client.view.table.merge(record, time.time(), source="bootstrap")
    others = frozenset({nodes[2].peer_id})  # B2: the client must go through B first
    route = client.plan(exclude=others)
    assert [h.peer_id for h in route.hops] == [nodes[0].peer_id, nodes[1].peer_id, nodes[3].peer_id]
    assert all(h.url.startswith("https://") for h in client.planner.hops(route))
    return client, route


def _assert_refused_as_impostor(client, node: NodeProcess) -> None:
    """The client banned `node` for presenting another identity, not for anything else."""
    measurements = client.planner.measurements
    assert node.peer_id in measurements.banned(client.planner.clock())
    assert measurements.peers[node.peer_id].last_offence.startswith("identity_mismatch:")


async def test_a_tls_swarm_generates_the_plain_swarms_text(tls_swarm, relay, plain_text):
    bootstrap, nodes, _ = tls_swarm
    await _listed(bootstrap, {n.peer_id for n in nodes})
    assert all(n.url.startswith("https://") for n in (bootstrap, *nodes))
    client = swarm_client(bootstrap.url, tls=True)
    result = await client.agenerate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert result.text == plain_text and result.stats.failovers == []
    async with TLS.client_session() as http, http.get(f"{nodes[0].url}/info", ssl=TLS.pin(nodes[0].peer_id)) as response:
        info = await response.json()
    assert info["url"].startswith("https://") and info["discovery"]["address_policy"]["schemes"] == ["https"]


async def test_a_man_in_the_middle_is_refused_and_the_client_reroutes(tls_swarm, relay, plain_text):
    _, nodes, _ = tls_swarm
    client, route = await _client_routed_through_b(tls_swarm)
    relay.set(nodes[1], attack=("mitm", nodes[1]))  # now it terminates TLS with its own certificate
    result = await client.agenerate(PROMPT, route=route, max_new_tokens=NEW_TOKENS)
    assert relay.seen["mitm"] >= 1  # the client did dial B's address, and met the relay there
    assert result.text == plain_text
    assert not any(name.startswith(nodes[1].peer_id[:8]) for name in result.route)
    _assert_refused_as_impostor(client, nodes[1])


async def test_an_impostor_at_a_nodes_address_is_refused_and_the_client_reroutes(tls_swarm, relay, plain_text):
    _, nodes, _ = tls_swarm
    client, route = await _client_routed_through_b(tls_swarm)
    relay.set(nodes[1], attack=("impostor", nodes[2]))  # B's address now leads to B2, a real node serving the same blocks
    result = await client.agenerate(PROMPT, route=route, max_new_tokens=NEW_TOKENS)
    assert relay.seen["impostor"] >= 1 and result.text == plain_text
    assert [name[:8] for name in result.route] == [nodes[0].peer_id[:8], nodes[2].peer_id[:8], nodes[3].peer_id[:8]]
    _assert_refused_as_impostor(client, nodes[1])


@pytest.mark.parametrize("attack", ["mitm", "impostor"])
async def test_a_node_pushing_to_that_address_refuses_it_too(tls_swarm, relay, attack):
    """A -> B through the relay: the client's own dial of B (from 127.0.0.2) is relayed untouched,
    A's push (from 127.0.0.1) meets the attack; A names B in an `identity_mismatch`."""
    _, nodes, _ = tls_swarm
    client, route = await _client_routed_through_b(tls_swarm)
    hops = client.planner.hops(route)
    # The attack starts before the session: A's push connections to B relayed earlier are ended.
    relay.set(nodes[1], attack=(attack, nodes[1] if attack == "mitm" else nodes[3]))  # impostor: C answers for B
    connector = aiohttp.TCPConnector(ssl=False, local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        async with RouteSession(http, hops, client.planner.model_digest, 64, SessionConfig(wire_dtype="float32"), TLS) as session:
            hidden = client.head.embed(client.head.encode_prompt(PROMPT, chat=True))
            with pytest.raises(IdentityMismatch) as refused:
                await session.forward(hidden, 0)
    assert hop_of(refused.value) is not None and hop_of(refused.value).peer_id == nodes[1].peer_id
    assert relay.seen[attack] >= 1 and relay.seen["relayed"] >= 1  # A met the attack, the client did not


async def test_the_client_refuses_a_pinned_hop_at_once_without_opening(tls_swarm, relay):
    """The session-level contract: a hop whose address presents another identity fails `_connect`
    with `IdentityMismatch` naming that hop (before any `open` is sent to anyone)."""
    _, nodes, _ = tls_swarm
    relay.set(nodes[1], attack=("impostor", nodes[2]))
    hop = RemoteHop(relay.url, 10, 20, nodes[1].peer_id)
    async with TLS.client_session() as http:
        session = RouteSession(http, [hop], "0" * 32, 8, SessionConfig(), TLS)
        with pytest.raises(IdentityMismatch, match=f"{nodes[2].peer_id} answered there") as refused:
            await session.__aenter__()
    assert hop_of(refused.value) is hop


def test_a_tls_node_refuses_http_urls_in_one_line(tmp_path):
    """Before anything loads: a TLS node never dials an http bootstrap, nor advertises an http URL."""
    import subprocess
    import sys

    for flag, expected in (("--bootstrap", "a TLS node dials https only"), ("--public-url", "this node serves https")):
        done = subprocess.run(
            [sys.executable, "-m", "node.cli", "--identity", str(tmp_path / "key"), "--blocks", "0:1", flag, "http://127.0.0.1:9"],
            check=False, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {flag} http://127.0.0.1:9: {expected}"), lines
