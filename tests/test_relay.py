"""Relays on loopback: two nodes that hold relays (`--relay-always`) serve a generation through them.

The swarm: a bootstrap peer, relays R1 and R2 (model-less peers), node A [0,15) and node B
[15,30), each relayed through R1 and R2. Every connection to A or B goes through a relay,
with TLS end to end pinned to the node. Beside the happy path, the attacks on a relay: an
open proxy (a server name it does not relay for, a bad token, plain HTTP CONNECT), its
capacity, forged attaches. A legitimate generation beside them keeps its text.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
import urllib.request

import aiohttp
import pytest

from client.generate import GenerationStats, LocalBlocks, stream_tokens
from client.sampling import SamplingParams
from swarm import wire
from swarm.identity import Identity
from swarm.records import PeerRecord
from swarm.relay_wire import attach_payload, data_preamble, new_token, sni_name
from swarm.transport import Transport, peer_id_of_certificate
from tests.nodes import refresh, reserve_url, start_nodes, stop_nodes, swarm_client, until_routed
from tests.relay_probes import closed_without_tls, hello, info, port_of, served_by

PROMPT = "Write a long story about a dragon who learns to cook."
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relay")
    b_port, b_url = reserve_url(tls=True)
    r1_port, r1_url = reserve_url(tls=True)
    r2_port, r2_url = reserve_url(tls=True)
    gossip = ["--gossip-period", "0.5"]
    relays = ["--relay-always", "--relay", r1_url, "--relay", r2_url]
    specs = [
        ["--no-model", *b_port, *gossip],
        ["--no-model", *r1_port, "--bootstrap", b_url, *gossip, "--header-timeout", "3"],
        ["--no-model", *r2_port, "--bootstrap", b_url, *gossip, "--relay-capacity", "2", "--relay-connections", "8"],
        ["--blocks", "0:15", "--bootstrap", b_url, *gossip, *relays],
        ["--blocks", "15:30", "--bootstrap", b_url, *gossip, *relays],
    ]
    nodes = start_nodes(specs, tmp, tls=True)
    bootstrap, r1, r2, a, b = nodes
    for relay in (r1, r2):
        _until(lambda relay=relay: info(relay.url)["relay"]["host"]["attached"] == 2, "both nodes attached to each relay")
    yield bootstrap, r1, r2, a, b
    stop_nodes(nodes)


@pytest.fixture(scope="module")
def client(swarm):
    bootstrap, *_ = swarm
    model = swarm_client(bootstrap.url, tls=True)
    asyncio.run(until_routed(model))
    return model


@pytest.fixture(scope="module")
def baseline(client, full_span):
    """The text of the whole model in this process: what every relayed run must equal."""
    ids = client.head.encode_prompt(PROMPT, chat=True)
    stats = GenerationStats()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False)

    async def run():
        async for _ in stream_tokens(client.head, LocalBlocks(full_span, len(ids) + NEW_TOKENS), ids, params, stats):
            pass

    asyncio.run(run())
    return stats.token_ids


def _until(check, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def _record(node) -> PeerRecord:
    import base64

    return PeerRecord.from_bytes(base64.b64decode(info(node.url)["record"]))


async def _generate(client, at_token: dict | None = None, route=None):
    """Generate greedily; at_token[n](hops) is called once n tokens have come, with the route's hops."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_at_eos=False, speculate=False)
    stats = GenerationStats()
    hops = []
    async for _ in client.stream_generation(client.head.encode_prompt(PROMPT, chat=True), params, stats, route, on_route=lambda seen: hops.__setitem__(slice(None), seen)):
        action = (at_token or {}).pop(len(stats.token_ids), None)
        if action is not None:
            action(list(hops))
    stats.route = [str(h) for h in hops]  # the hops at the end, as "peer[start:end)"
    return stats


# --- the happy path -------------------------------------------------------------------------


def test_relayed_records_name_the_relays(swarm):
    bootstrap, r1, r2, a, b = swarm
    for node in (a, b):
        record = _record(node)
        assert record.relayed and not record.offers_relay
        assert set(record.addresses) == {r1.url, r2.url}, "a relayed node is reached only through its relays"
        assert node.url not in record.addresses
    assert _record(r1).offers_relay and not _record(r1).relayed


def test_generation_through_two_relayed_nodes_equals_the_local_text(client, baseline, swarm):
    _, r1, r2, a, b = swarm
    before = sum(info(r.url)["relay"]["host"]["spliced"] for r in (r1, r2))
    stats = asyncio.run(_generate(client))
    assert stats.token_ids == baseline
    assert [h[:8] for h in stats.route] == [a.peer_id[:8], b.peer_id[:8]]
    hosts = [info(r.url)["relay"]["host"] for r in (r1, r2)]
    assert sum(h["spliced"] for h in hosts) > before
    assert sum(h["bytes_to_nodes"] for h in hosts) > 0 and sum(h["bytes_from_nodes"] for h in hosts) > 0


def test_metrics_show_the_relay(swarm):
    _, r1, *_ = swarm
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with urllib.request.urlopen(f"{r1.url}/metrics", timeout=10, context=context) as response:
        text = response.read().decode()
    assert "layerswarm_relay_attached_nodes 2" in text
    assert "layerswarm_relay_bytes_total" in text


# --- not an open proxy ------------------------------------------------------------------------


def test_a_server_name_the_relay_never_relayed_for_gets_the_relays_own_tls(swarm):
    """Not a splice to anywhere: the relay's own certificate answers, so a dialler pinned to that
    peer refuses it (identity_mismatch), as at any address where another peer answers."""
    _, r1, *_ = swarm

    spliced = info(r1.url)["relay"]["host"]["spliced"]
    tls = hello(port_of(r1), sni_name(Identity.generate().peer_id))
    try:
        tls.do_handshake()
        assert peer_id_of_certificate(tls.getpeercert(binary_form=True)) == r1.peer_id
    finally:
        tls.close()
    assert info(r1.url)["relay"]["host"]["spliced"] == spliced


def test_the_relays_own_name_gets_its_own_tls(swarm):
    _, r1, *_ = swarm
    tls = hello(port_of(r1), sni_name(r1.peer_id))
    try:
        tls.do_handshake()
        from swarm.transport import peer_id_of_certificate

        assert peer_id_of_certificate(tls.getpeercert(binary_form=True)) == r1.peer_id
    finally:
        tls.close()


@pytest.mark.parametrize("token", ["unknown", "malformed"])
def test_a_data_connection_with_a_token_the_relay_did_not_issue_is_closed(swarm, token):
    _, r1, *_ = swarm
    preamble = data_preamble(new_token()) if token == "unknown" else b"LSRELAY1 " + b"z" * 32 + b"\n"
    refused = info(r1.url)["relay"]["host"]["refused"].get("bad_token", 0)
    with socket.create_connection(("127.0.0.1", port_of(r1)), timeout=10) as raw:
        raw.sendall(preamble + b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert answer == b"", "the relay must close it, answering nothing"
    assert info(r1.url)["relay"]["host"]["refused"].get("bad_token", 0) == refused + 1


def test_plain_http_connect_is_not_proxied(swarm):
    _, r1, _, a, _ = swarm
    with socket.create_connection(("127.0.0.1", port_of(r1)), timeout=10) as raw:
        raw.sendall(f"CONNECT 127.0.0.1:{port_of(a)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        answer = raw.recv(4096)
    assert b"200" not in answer.split(b"\r\n", 1)[0], "a relay is no HTTP proxy"


def test_a_stranger_trickling_a_client_hello_is_closed_in_time(swarm):
    """R1's header timeout is 3 s: a ClientHello that never completes holds its connection that
    long for the relay to read the name, then as long again for a TLS handshake, then it is closed."""
    _, r1, _, a, _ = swarm
    hello = _HELLO_OF_A(a.peer_id)
    with socket.create_connection(("127.0.0.1", port_of(r1)), timeout=30) as raw:
        raw.sendall(hello[:40])
        began = time.monotonic()
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:
            answer = b""
        waited = time.monotonic() - began
    assert answer == b"" and waited < 20, f"closed after {waited:.1f} s"


def _HELLO_OF_A(peer_id: str) -> bytes:
    from tests.test_relay_units import _client_hello

    return _client_hello(sni_name(peer_id))


def test_a_dial_back_answer_with_a_nonce_nobody_issued_is_refused(swarm, client, baseline):
    """`POST /reach/back` takes only a nonce the node is waiting for: anything else is a typed
    refusal that changes nothing, and the swarm's text is unchanged."""
    _, r1, *_ = swarm

    async def answer(body: bytes) -> tuple[int, dict]:
        transport = Transport()
        async with transport.client_session() as http:
            async with http.post(f"{r1.url}/reach/back", data=body, ssl=transport.pin(r1.peer_id)) as response:
                return response.status, wire.decode(await response.read())

    status, message = asyncio.run(answer(wire.encode({"type": "reach_back", "nonce": os.urandom(16)})))
    assert status == 400 and message["code"] == "bad_request"
    status, message = asyncio.run(answer(b"\x00" * 300))
    assert status == 400 and message["type"] == "error"
    assert asyncio.run(_generate(client)).token_ids == baseline


# --- attach ----------------------------------------------------------------------------------


async def _attach(relay, identity: Identity, forge: str = "") -> dict:
    """Attach `identity` to `relay` over its control socket; `forge` breaks the proof one way."""
    transport = Transport()
    async with transport.client_session() as http:
        async with http.ws_connect(f"{relay.url}/relay/attach", ssl=transport.pin(relay.peer_id)) as ws:
            challenge = wire.decode((await ws.receive(timeout=10)).data)
            nonce = challenge["nonce"] if forge != "nonce" else os.urandom(16)
            signer = identity if forge != "key" else Identity.generate()
            signature = signer.sign(attach_payload(relay.peer_id, identity.peer_id, nonce))
            await ws.send_bytes(wire.encode({"type": "attach", "peer_id": identity.peer_id, "public_key": identity.public_key_bytes, "signature": signature}))
            message = await ws.receive(timeout=10)
            return wire.decode(message.data) if message.type is aiohttp.WSMsgType.BINARY else {"type": "closed"}


@pytest.mark.parametrize("forge", ["nonce", "key"])
def test_an_attach_without_a_proof_on_the_relays_nonce_is_refused(swarm, forge):
    _, r1, *_ = swarm
    answer = asyncio.run(_attach(r1, Identity.generate(), forge))
    assert answer["type"] == "error" and answer["code"] == "signature_invalid"
    assert info(r1.url)["relay"]["host"]["attached"] == 2


def test_a_full_relay_answers_busy(swarm, client, baseline):
    """R2 relays for 2 nodes at most: a third is refused `busy`, and the swarm's text is unchanged."""
    _, _, r2, _, _ = swarm

    async def third():
        transport = Transport()
        async with transport.client_session() as http:
            try:
                async with http.ws_connect(f"{r2.url}/relay/attach", ssl=transport.pin(r2.peer_id)):
                    return "attached"
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(third()) == 503
    assert info(r2.url)["relay"]["host"]["refused"]["busy"] >= 1
    assert asyncio.run(_generate(client)).token_ids == baseline


def test_a_stranger_holding_all_of_a_nodes_relayed_connections_is_evicted_for_another_source(swarm, client, baseline):
    """R2 splices at most 8 connections to one node. A stranger at 127.0.0.2 may take every free
    place, but then another source still gets in (the stranger's oldest is closed for it) and is
    served by A's own TLS (pinned: A's key); the stranger itself is refused beyond the 8, and the
    legitimate client's text is unchanged."""
    _, _, r2, a, _ = swarm
    held: list[ssl.SSLSocket] = []

    def spliced(source: str) -> bool:
        tls = hello(port_of(r2), sni_name(a.peer_id), source)
        try:
            tls.do_handshake()  # spliced to A: A's own TLS answers
        except (ssl.SSLError, OSError):
            tls.close()
            return False
        held.append(tls)
        return True

    try:
        before = info(r2.url)["relay"]["host"]
        for _ in range(16):  # the client's own pooled connections (127.0.0.1) may hold some places
            if not spliced("127.0.0.2"):
                break
        host = info(r2.url)["relay"]["host"]
        assert host["nodes"][a.peer_id]["connections"] == 8
        assert host["refused"].get("connections", 0) == before["refused"].get("connections", 0) + 1
        assert served_by(r2, a, "127.0.0.9"), "another source was not served while the stranger held every place"
        assert info(r2.url)["relay"]["host"]["evicted"] == before["evicted"] + 1
        more = [spliced("127.0.0.2") for _ in range(2)]  # at most the place the other source left
        assert more.count(True) <= 1 and info(r2.url)["relay"]["host"]["nodes"][a.peer_id]["connections"] <= 8, more
        asyncio.run(refresh(client))
        assert asyncio.run(_generate(client)).token_ids == baseline
    finally:
        for tls in held:
            tls.close()


# --- a relay dies ------------------------------------------------------------------------------


def test_a_relay_killed_mid_generation_moves_the_nodes_to_the_other_and_the_text_stays(swarm, client, baseline):
    """Kill the relay that carries the generation's connections, after some tokens: the client
    reaches the same nodes through the other relay, and the nodes re-announce without the dead one."""
    _, r1, r2, a, b = swarm
    asyncio.run(refresh(client))
    dead = []

    def kill_the_first_hops_relay(hops) -> None:  # the client's own connection to A goes through it
        dead.append(r1 if hops[0].url.rstrip("/") == r1.url else r2)
        dead[0].kill()

    stats = asyncio.run(_generate(client, {8: kill_the_first_hops_relay}))
    used, other = (r1, r2) if dead[0] is r1 else (r2, r1)
    assert stats.token_ids == baseline
    assert stats.failovers, "the relay's death must have been noticed"
    assert all(f.failed[:8] in (a.peer_id[:8], b.peer_id[:8]) for f in stats.failovers)
    assert [h[:8] for h in stats.route] == [a.peer_id[:8], b.peer_id[:8]], "the same nodes, through the other relay"
    for node in (a, b):
        _until(lambda node=node: used.url not in _record(node).addresses, "the node re-announced without the dead relay")
        assert other.url in _record(node).addresses


def test_a_relay_closes_dials_to_a_node_that_left_it(swarm):
    """A stale record may still name a relay for a node that moved on: that relay closes the dial
    (so the dialler tries the node's other addresses) rather than answer with its own key."""
    _, r1, r2, a, _ = swarm
    alive = r2 if r1.proc.poll() is not None else r1  # the kill test left one relay
    a.kill()
    _until(lambda: a.peer_id not in info(alive.url)["relay"]["host"]["nodes"], "the relay noticed the node left")
    assert closed_without_tls(port_of(alive), sni_name(a.peer_id))
    assert info(alive.url)["relay"]["host"]["refused"]["departed"] >= 1

