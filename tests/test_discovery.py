"""Discovery between real `swarm-node` processes: gossip on loopback, mDNS on loopback and across namespaces."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import aiohttp
import pytest

from swarm import wire
from swarm.discovery.peers_http import fetch_peers
from swarm.identity import Identity
from swarm.records import PeerRecord
from tests.nodes import start_nodes, stop_nodes

PERIOD = 0.3  # gossip period in these tests
TTL = 3.0  # record lifetime: a killed node leaves every table within TTL + a period or two
GONE_BOUND = TTL + 4 * PERIOD


def _gossip_args(bootstrap: str | None = None) -> list[str]:
    args = ["--gossip-period", str(PERIOD), "--record-ttl", str(TTL)]
    return args + (["--bootstrap", bootstrap] if bootstrap else [])


async def _tables(http, nodes) -> list[set[str]]:
    tables = []
    for node in nodes:
        records = await fetch_peers(http, node.url, 5.0)
        tables.append({r.peer_id for r in records})
    return tables


async def _until(predicate, timeout: float, http, nodes) -> float:
    """Poll every node's table until `predicate(tables)` holds; returns the seconds it took."""
    began = time.monotonic()
    while True:
        tables = await _tables(http, nodes)
        if predicate(tables):
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError(f"tables did not get there in {timeout} s: {tables}")
        await _pause()


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.1)  # polling other processes' tables: there is no event to await across processes


@pytest.fixture(scope="module")
def gossip_swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gossip")
    (bootstrap,) = start_nodes([["--no-model", *_gossip_args()]], tmp / "b")
    spans = ["0:1", "1:2", "2:3", "3:30"]
    everyone = [bootstrap, *start_nodes([["--blocks", s, *_gossip_args(bootstrap.url)] for s in spans], tmp)]
    yield tmp, everyone  # a test may replace a node in it (a restart): what is in it at the end is stopped
    stop_nodes(everyone)


async def test_five_nodes_converge_expire_and_return(gossip_swarm):
    tmp, nodes = gossip_swarm
    everyone = {n.peer_id for n in nodes}
    async with aiohttp.ClientSession() as http:
        took = await _until(lambda tables: all(t == everyone for t in tables), 30, http, nodes)
        print(f"5 nodes converged in {took:.2f} s")

        victim = nodes[2]
        victim.kill()  # SIGKILL: no goodbye, its record must expire
        alive = [n for n in nodes if n is not victim]
        gone = await _until(lambda tables: all(victim.peer_id not in t for t in tables), GONE_BOUND + 5, http, alive)
        assert gone <= GONE_BOUND, f"killed node lingered {gone:.2f} s (bound {GONE_BOUND} s)"
        print(f"killed node gone from every table after {gone:.2f} s (bound {GONE_BOUND} s)")

        # restarted with the same identity (and a new port): back everywhere
        key = tmp / f"node1-{os.getpid()}.key"  # the key start_nodes gave it (an explicit --identity wins)
        (back,) = start_nodes([["--blocks", "1:2", *_gossip_args(nodes[0].url), "--identity", str(key)]], tmp / "restart")
        assert back.peer_id == victim.peer_id
        nodes[2] = back
        returned = await _until(lambda tables: all(t == everyone for t in tables), 30, http, nodes)
        print(f"restarted node back in every table after {returned:.2f} s")

        # SIGTERM: the node publishes a signed `leaving` record before it stops
        leaver = nodes[3]
        leaver.terminate()
        rest = [n for n in nodes if n is not leaver]
        left = await _until(lambda tables: all(leaver.peer_id not in t for t in tables), 10, http, rest)
        assert left < TTL, f"a graceful leave should beat expiry; took {left:.2f} s"


async def test_swarm_peers_cli_lists_the_swarm_and_its_coverage(gossip_swarm):
    _, nodes = gossip_swarm
    async with aiohttp.ClientSession() as http:
        await _until(lambda tables: len(tables[0]) >= 4, 30, http, nodes[:1])
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "peers", "--insecure-http", "--bootstrap", nodes[0].url, "--json"], capture_output=True, text=True, timeout=60, check=True
    )
    view = json.loads(out.stdout)
    spans = sorted(tuple(p["span"]) for p in view["peers"] if p["span"])
    assert (3, 30) in spans and (0, 1) in spans
    assert any("missing none" in line or "missing" in line for line in view["coverage"])
    refused = subprocess.run([sys.executable, "-m", "client.cli", "peers", "--insecure-http", "--bootstrap", "http://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.strip() == "error: no bootstrap peer answered: http://127.0.0.1:1"


async def _prover_of(identity: Identity, stack) -> str:
    """Serve `identity`'s proof endpoint on 127.0.0.1 port 0; its URL (the record's address)."""
    from aiohttp import web

    from swarm.discovery.peers_http import peers_routes
    from swarm.peers import PeerTable

    table = PeerTable()
    runner = web.AppRunner(web.Application())
    runner.app.add_routes(peers_routes(table, identity=identity))
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    table.merge(PeerRecord.create(identity, addresses=(url,), now=time.time(), ttl=60.0), time.time(), source="self")
    return url


async def test_forged_records_are_refused_by_a_real_node(gossip_swarm):
    import asyncio
    import contextlib

    _, nodes = gossip_swarm
    target = nodes[0].url
    me, other = Identity.generate(), Identity.generate()
    good = PeerRecord.create(me, addresses=("http://127.0.0.1:9",), now=time.time(), ttl=TTL)
    forged = dict(good.to_wire(), signature=bytes(64))
    stolen_id = dict(PeerRecord.create(other, addresses=("http://127.0.0.1:9",), now=time.time(), ttl=TTL).to_wire(), peer_id=me.peer_id)
    expired = PeerRecord.create(me, addresses=("http://127.0.0.1:9",), now=time.time() - 100, ttl=TTL).to_wire()
    future = PeerRecord.create(me, addresses=("http://127.0.0.1:9",), now=time.time() + 3600, ttl=TTL).to_wire()
    async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
        for record in (forged, stolen_id, expired, future, good.to_wire()):
            async with http.post(f"{target}/peers", data=wire.encode({"type": "peers", "records": [record]})) as response:
                assert response.status == 200
        async with http.post(f"{target}/peers", data=b"\x00garbage") as response:
            assert response.status == 400 and wire.decode(await response.read())["code"] == "bad_request"
        ids = {r.peer_id for r in await fetch_peers(http, target, 5.0)}
        # `good` is genuine, but nobody at its address holds its key: never listed
        assert me.peer_id not in ids and other.peer_id not in ids
        # a genuine record whose address answers with its key is proven and listed at once
        url = await _prover_of(me, stack)
        proven = PeerRecord.create(me, addresses=(url,), now=time.time(), ttl=TTL)
        async with http.post(f"{target}/peers", data=wire.encode({"type": "peers", "records": [proven.to_wire()]})) as response:
            assert response.status == 200
        for _ in range(100):
            if me.peer_id in {r.peer_id for r in await fetch_peers(http, target, 5.0)}:
                break
            await asyncio.sleep(0.05)  # the proof runs in the node process: no event to await from here
        else:
            raise AssertionError("a proven record was not listed within 5 s")


def _peers_via_mdns(prefix: list[str], interface: str, wait: float = 3.0) -> set[str]:
    argv = [*prefix, sys.executable, "-m", "client.cli", "peers", "--insecure-http", "--mdns", "--mdns-interface", interface, "--wait", str(wait), "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    return {p["peer_id"] for p in json.loads(out.stdout)["peers"]}


def test_mdns_on_loopback_finds_a_node_and_its_goodbye_removes_it(tmp_path):
    (node,) = start_nodes([["--blocks", "0:1", "--mdns", "--mdns-interface", "127.0.0.1"]], tmp_path)
    try:
        assert node.peer_id in _peers_via_mdns([], "127.0.0.1")
        assert node.terminate() == 0
        assert node.peer_id not in _peers_via_mdns([], "127.0.0.1")
    finally:
        node.kill()


def test_mdns_across_network_namespaces(lan_factory, tmp_path):
    lan = lan_factory(3)
    a, b, client = lan.hosts
    nodes = []
    try:
        def start(host, blocks):
            args = ["--blocks", blocks, "--host", host.address, "--mdns", "--mdns-interface", host.address]
            nodes.extend(start_nodes([args], tmp_path / host.namespace, prefix=["ip", "netns", "exec", host.namespace]))

        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # side by side; every node started is stopped below
            starting = [pool.submit(start, host, blocks) for host, blocks in ((a, "0:1"), (b, "1:2"))]
        for future in starting:
            future.result()
        nodes.sort(key=lambda n: n.blocks)  # nodes[0] holds 0:1
        in_client = ["ip", "netns", "exec", client.namespace]
        seen = _peers_via_mdns(in_client, client.address)
        assert {n.peer_id for n in nodes} <= seen
        assert nodes[0].terminate() == 0  # goodbye packets
        seen = _peers_via_mdns(in_client, client.address)
        assert nodes[0].peer_id not in seen and nodes[1].peer_id in seen
    finally:
        stop_nodes(nodes)
