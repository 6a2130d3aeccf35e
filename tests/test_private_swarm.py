"""Private swarms between real nodes: members generate what the open swarm generates; outsiders
neither join, nor get listed, nor get routed to, nor talk; captured proofs cannot be replayed
or sent to another node (mDNS of a private swarm: tests/test_private_mdns.py).

The loopback swarm serves plain http (the tests' fixture); one test runs a private swarm over
TLS, with a member reached only through a relay.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from swarm import wire
from swarm.discovery.peers_http import fetch_peers
from swarm.errors import NotMember
from swarm.identity import Identity
from swarm.membership import (
    CHALLENGE_BYTES,
    CHALLENGE_HEADER,
    CHALLENGE_PATH,
    NONCE_HEADER,
    PROOF_HEADER,
    Membership,
    client_proof,
    decode,
    encode,
    format_proof,
)
from swarm.records import PeerRecord
from swarm.swarm_key import SwarmKey
from swarm.transport import Transport
from tests.nodes import reserve_url, start_nodes, stop_nodes, swarm_client

PERIOD = "0.5"  # gossip period of these nodes
PROMPT = "What is the capital of France?"
TOKENS = 12


def _key_file(folder: Path, name: str) -> tuple[Path, SwarmKey]:
    key = SwarmKey.generate()
    path = folder / name
    key.write(path)
    return path, key


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return _key_file(folder, "swarm.key"), _key_file(folder, "other.key")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, keys):
    """A private bootstrap peer and two members ([0,15) and [15,30)); an open node holding all 30
    blocks (the most attractive hop there is) that announces to the private bootstrap peer, and
    that the first member also names as a bootstrap peer."""
    tmp = tmp_path_factory.mktemp("private")
    (path, _), _ = keys
    private = ["--swarm-key", str(path), "--gossip-period", PERIOD]
    bootstrap_port, bootstrap_url = reserve_url()
    outsider_port, outsider_url = reserve_url()
    specs = [
        ["--no-model", *bootstrap_port, *private],
        ["--blocks", "0:30", *outsider_port, "--gossip-period", PERIOD, "--bootstrap", bootstrap_url],
        ["--blocks", "0:15", "--bootstrap", bootstrap_url, "--bootstrap", outsider_url, *private],
        ["--blocks", "15:30", "--bootstrap", bootstrap_url, *private],
    ]
    bootstrap, outsider, *members = start_nodes(specs, tmp)  # all at once (`reserve_url`)
    try:
        asyncio.run(_members_listed(keys, [bootstrap, *members]))  # rounds before the bootstrap peer was up failed
        yield bootstrap, members, outsider
    finally:
        stop_nodes([bootstrap, outsider, *members])


def _peers(route: list[str]) -> set[str]:
    """The peers of a route as it is reported ("abcdefgh[0:15)" per hop)."""
    return {hop.split("[")[0] for hop in route}


def _short(nodes) -> set[str]:
    return {node.peer_id[:8] for node in nodes}


def _member_session(key: SwarmKey, capture: list | None = None) -> aiohttp.ClientSession:
    """A member's HTTP session (plain http); `capture` records each request's headers as sent."""
    membership = Membership(key)

    async def record(request, handler):
        capture.append((request.method, str(request.url), dict(request.headers)))
        return await handler(request)

    middlewares = (membership.client_middleware, record) if capture is not None else (membership.client_middleware,)
    return aiohttp.ClientSession(middlewares=middlewares)


async def _listed(http: aiohttp.ClientSession, url: str) -> set[str]:
    return {record.peer_id for record in await fetch_peers(http, url, 5.0)}


async def _until_listed(http, nodes, expected: set[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        tables = [await _listed(http, node.url) for node in nodes]
        if all(table == expected for table in tables):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"tables {tables} never became {expected}")
        await asyncio.sleep(0.2)  # other processes' tables: there is no event to await


async def _members_listed(keys, nodes) -> None:
    (_, key), _ = keys
    async with _member_session(key) as http:
        await _until_listed(http, nodes, {n.peer_id for n in nodes})


async def test_members_generate_the_open_swarms_text_and_never_route_to_an_outsider(swarm, keys):
    bootstrap, members, outsider = swarm
    (path, _), _ = keys
    open_text = (await swarm_client(outsider.url).agenerate(PROMPT, max_new_tokens=TOKENS)).text
    client = swarm_client(bootstrap.url, swarm_key=path)
    result = await client.agenerate(PROMPT, max_new_tokens=TOKENS)
    assert result.text == open_text and result.text
    assert _peers(result.route) <= _short(members), result.route
    assert outsider.peer_id not in client.view.table  # one hop over all 30 blocks, yet never seen


async def test_an_outsider_node_never_joins_and_a_member_never_joins_it(swarm, keys):
    bootstrap, members, outsider = swarm
    (_, key), _ = keys
    everyone = {bootstrap.peer_id, *(m.peer_id for m in members)}
    async with _member_session(key) as http:
        await _until_listed(http, [bootstrap, *members], everyone)
        await asyncio.sleep(4 * float(PERIOD))  # several more gossip rounds, each refused
        await _until_listed(http, [bootstrap, *members], everyone, timeout=0)
        with pytest.raises(NotMember, match="not in this private swarm"):
            await fetch_peers(http, outsider.url, 5.0)  # a member never takes an open node's answer
    async with Transport(insecure_http=True).client_session() as http:
        assert await _listed(http, outsider.url) == {outsider.peer_id}  # the member that names it as bootstrap told it nothing
        with pytest.raises(NotMember, match="belongs to a private swarm: pass --swarm-key FILE"):
            await fetch_peers(http, bootstrap.url, 5.0)
        async with http.get(outsider.url + "/info") as response:
            assert (await response.json())["private"] is False


async def test_strangers_are_refused_before_any_work(swarm, keys):
    bootstrap, members, _ = swarm
    stranger = Identity.generate()
    record = PeerRecord.create(stranger, addresses=["http://127.0.0.1:9"], now=time.time(), ttl=60)
    frame = wire.encode({"type": "peers", "records": [record.to_wire()]})
    async with aiohttp.ClientSession() as raw:  # no middleware: what a stranger's script sends
        for method, url, body in (
            ("POST", bootstrap.url + "/peers", frame),
            ("GET", members[0].url + "/info", None),
            ("POST", members[0].url + "/forward", b"\x80"),
            ("GET", members[0].url + "/peers/proof?nonce=" + "00" * 32, None),
        ):
            async with raw.request(method, url, data=body) as response:
                assert response.status == 401, (method, url)
                assert wire.decode(await response.read())["code"] == "not_member"
                assert CHALLENGE_HEADER in response.headers
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await raw.ws_connect(members[0].url + "/session")
        assert refused.value.status == 401
    (_, key), _ = keys
    async with _member_session(key) as http:
        assert stranger.peer_id not in await _listed(http, bootstrap.url)


async def test_api_clients_without_the_key_or_with_another_get_one_clear_line(swarm, keys):
    bootstrap, _, outsider = swarm
    (path, _), (other, _) = keys
    with pytest.raises(NotMember) as refused:
        await swarm_client(bootstrap.url).agenerate(PROMPT, max_new_tokens=2)
    assert str(refused.value) == f"{bootstrap.url} belongs to a private swarm: pass --swarm-key FILE"
    with pytest.raises(NotMember, match="belongs to another private swarm"):
        await swarm_client(bootstrap.url, swarm_key=other).agenerate(PROMPT, max_new_tokens=2)
    with pytest.raises(NotMember, match="is not in this private swarm"):
        await swarm_client(outsider.url, swarm_key=path).agenerate(PROMPT, max_new_tokens=2)


def test_the_cli_without_the_key_or_with_another_exits_with_one_line(swarm, keys):
    bootstrap, _, outsider = swarm
    (path, _), (other, _) = keys
    cli = [sys.executable, "-m", "client.cli"]
    done = subprocess.run([*cli, "generate", PROMPT, "--bootstrap", bootstrap.url, "--insecure-http"], capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"error: {bootstrap.url} belongs to a private swarm: pass --swarm-key FILE\n")
    done = subprocess.run([*cli, "peers", "--bootstrap", bootstrap.url, "--insecure-http", "--swarm-key", str(other)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "belongs to another private swarm" in done.stderr
    done = subprocess.run([*cli, "peers", "--bootstrap", bootstrap.url, "--insecure-http", "--swarm-key", str(path), "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert outsider.peer_id not in {peer["peer_id"] for peer in json.loads(done.stdout)["peers"]}


async def test_a_captured_proof_is_refused_when_replayed_or_sent_to_another_node(swarm, keys):
    _, members, _ = swarm
    (_, key), _ = keys
    first, second = members
    sent: list = []
    async with _member_session(key, sent) as http:
        async with http.get(first.url + "/peers") as response:
            assert response.status == 200
        ws = await http.ws_connect(first.url + "/session")
        await ws.close()
    (_, peers_url, peers_headers), (_, socket_url, socket_headers) = sent
    async with aiohttp.ClientSession() as raw:  # an eavesdropper on plain http replays them
        proof = {h: peers_headers[h] for h in (NONCE_HEADER, PROOF_HEADER)}
        async with raw.get(peers_url, headers=proof) as response:
            assert response.status == 401
            assert "already used" in wire.decode(await response.read())["message"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await raw.ws_connect(socket_url, headers={h: socket_headers[h] for h in (NONCE_HEADER, PROOF_HEADER)})
        assert refused.value.status == 401

        # A proof made for the first member (with its fresh challenge), never used there, sent to the second.
        async with raw.get(first.url + CHALLENGE_PATH) as response:
            challenge = decode(response.headers[CHALLENGE_HEADER], CHALLENGE_BYTES)
        nonce = os.urandom(16)
        headers = {NONCE_HEADER: encode(nonce), PROOF_HEADER: format_proof(challenge, client_proof(key, challenge, nonce, "GET", "/peers"))}
        async with raw.get(second.url + "/peers", headers=headers) as response:
            assert response.status == 401
            assert "not issued by this node" in wire.decode(await response.read())["message"]
        async with raw.get(first.url + "/peers", headers=headers) as response:
            assert response.status == 200  # where it was made for, it holds: once


async def test_a_private_swarm_over_tls_and_through_a_relay(tmp_path, keys):
    """The default transport: TLS pinned to identities, and the key proven inside it, here with
    the member reached only through a relay (the bootstrap peer; `--relay-always`). The relay
    splices for anyone who names the member, so the member's own membership check is what
    keeps strangers out: one dialling the member through the relay is refused there."""
    (path, key), (other, _) = keys
    private = ["--swarm-key", str(path), "--gossip-period", PERIOD]
    port, url = reserve_url(tls=True)
    relayed = ["--relay-always", "--relay", url]
    started = start_nodes([["--no-model", *port, *private], ["--blocks", "0:30", "--bootstrap", url, *private, *relayed]], tmp_path, tls=True)
    bootstrap, member = started
    try:
        assert bootstrap.url == url
        async with Transport(membership=Membership(key)).client_session() as http:
            await _until_listed(http, started, {n.peer_id for n in started})  # the member's first rounds may have come before the bootstrap peer was up
            await _until_relayed(http, bootstrap.url, member.peer_id)
            spliced = (await _info(http, bootstrap.url))["relay"]["host"]["bytes_to_nodes"]
            client = swarm_client(bootstrap.url, tls=True, swarm_key=key)
            result = await client.agenerate(PROMPT, max_new_tokens=TOKENS)
            assert _peers(result.route) == _short([member]) and result.text
            # the hidden states went through the relay (ciphertext: tests/test_relay_internet.py)
            assert (await _info(http, bootstrap.url))["relay"]["host"]["bytes_to_nodes"] > spliced
        async with Transport().client_session() as stranger:  # pinned to the member, at the relay's address
            with pytest.raises(NotMember, match="belongs to a private swarm"):
                async with stranger.get(f"{url}/info", ssl=Transport().pin(member.peer_id)) as response:
                    await response.read()
        with pytest.raises(NotMember, match="belongs to a private swarm"):
            await swarm_client(bootstrap.url, tls=True).agenerate(PROMPT, max_new_tokens=2)
        with pytest.raises(NotMember, match="another private swarm"):
            await swarm_client(bootstrap.url, tls=True, swarm_key=other).agenerate(PROMPT, max_new_tokens=2)
    finally:
        stop_nodes(started)


async def _info(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(f"{url}/info") as response:
        return await response.json()


async def _until_relayed(http: aiohttp.ClientSession, relay_url: str, peer_id: str, timeout: float = 60.0) -> None:
    """Until the relay holds `peer_id` attached and its table holds the record naming the relay."""
    deadline = time.monotonic() + timeout
    while True:
        attached = peer_id in (await _info(http, relay_url))["relay"]["host"]["nodes"]
        records = {record.peer_id: record for record in await fetch_peers(http, relay_url, 5.0)}
        if attached and peer_id in records and list(records[peer_id].addresses) == [relay_url]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{peer_id[:8]} never came to be relayed by {relay_url}")
        await asyncio.sleep(0.2)  # another process's state: there is no event to await
