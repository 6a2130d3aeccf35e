"""Private swarms over mDNS: an advert tells outsiders nothing and only members fetch records;
members in network namespaces find each other by mDNS, never list an open node beside them,
and generate the open node's text while a stranger on its own address floods a member.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from zeroconf.asyncio import AsyncServiceInfo

from swarm.discovery.mdns import PRIVATE_SERVICE_TYPE, Advert, Mdns, MdnsConfig
from swarm.identity import Identity
from swarm.membership import Membership
from swarm.peers import PeerTable
from swarm.records import PeerRecord
from swarm.swarm_key import SwarmKey
from swarm.transport import Transport
from tests.netns import beside_attacker
from tests.nodes import start_nodes, stop_nodes
from tests.test_private_swarm import PERIOD, PROMPT, TOKENS, _peers, _short

ROOT = Path(__file__).resolve().parent.parent

LOOPBACK = "127.0.0.1"
ADVERTISE = MdnsConfig(interfaces=[LOOPBACK], browse=False, ttl_s=4)
BROWSE = MdnsConfig(interfaces=[LOOPBACK], advertise=False, ttl_s=4, sweep_interval_s=1.0, probe_timeout_ms=1000)


@asynccontextmanager
async def _info_server(membership: Membership):
    """A stand-in private node: /info (a signed record) behind the membership check."""
    identity = Identity.generate()
    body: dict[str, str] = {}

    async def info(request: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    membership.install(app)
    app.router.add_get("/info", info)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        port = runner.addresses[0][1]
        record = PeerRecord.create(identity, addresses=[f"http://{LOOPBACK}:{port}"], now=time.time(), ttl=60)
        body.update(peer_id=identity.peer_id, record=base64.b64encode(record.to_bytes()).decode())
        yield identity, port
    finally:
        await runner.cleanup()


async def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def test_mdns_of_a_private_swarm_reveals_nothing_and_only_members_fetch():
    key = SwarmKey.generate()
    node = Membership(key)
    member, outsider, other_swarm = (PeerTable() for _ in range(3))
    private = Transport(insecure_http=True, membership=Membership(key))
    async with _info_server(node) as (identity, port), Mdns(BROWSE, table=member, transport=private) as browser:
        async with Mdns(BROWSE, table=outsider, transport=Transport(insecure_http=True)) as open_browser, Mdns(
            BROWSE, table=other_swarm, transport=Transport(insecure_http=True, membership=Membership(SwarmKey.generate()))
        ) as other_browser:
            advert = Advert(identity.peer_id, port, model="smollm2-secret-model", span=(3, 7), scheme="http")
            async with Mdns(ADVERTISE, advert=advert, transport=Transport(insecure_http=True, membership=node)) as advertiser:
                await _wait(lambda: identity.peer_id in member, 15, "a member finds the private node")
                # What anyone on the LAN can read: the peer id, scheme, version and an opaque tag.
                info = AsyncServiceInfo(PRIVATE_SERVICE_TYPE, f"{identity.peer_id}.{PRIVATE_SERVICE_TYPE}")
                assert await info.async_request(advertiser._azc.zeroconf, 3000)
                assert set(info.properties) == {b"id", b"v", b"s", b"tag"}
                assert b"smollm2-secret-model" not in b"".join(info.properties.values())
                await _wait(lambda: other_browser.failures["not_member"] > 0, 15, "another swarm's browser ignores it")
            assert identity.peer_id not in outsider and identity.peer_id not in other_swarm
            assert not any(identity.peer_id in name for name in open_browser._services)  # never even saw it
        assert node.stats["proven"] >= 1 and node.refused["wrong_key"] == 0  # nobody but the member fetched
        assert browser.failures["not_member"] == 0, browser.failures

        # An outsider advertising in the private type with a forged tag is ignored unfetched.
        forger = Identity.generate()
        fake = Advert(forger.peer_id, port, scheme="http")
        async with Mdns(ADVERTISE, advert=fake, transport=Transport(insecure_http=True, membership=Membership(SwarmKey.generate()))):
            await _wait(lambda: browser.failures["not_member"] > 0, 15, "a forged tag is ignored")
        assert forger.peer_id not in member


ATTACKER = Path(__file__).with_name("membership_attacker.py")
ATTACK_CONNECTIONS = 80  # over the default 64 connections per source


def _cli_in(lan, host, *args: str, timeout: float = 180.0) -> dict:
    """`swarm ... --json` run inside `host`; its JSON answer."""
    process = lan.run_in(host, [sys.executable, "-m", "client.cli", *args, "--json"], stderr=subprocess.PIPE, cwd=ROOT)
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return json.loads(out)


def test_members_find_each_other_by_mdns_and_outsiders_are_ignored(lan_factory, tmp_path):
    """Namespaces on one LAN: two members and an open node advertise with mDNS; nobody names a
    bootstrap peer. Members find each other, never list the open node, and a member generates
    the open node's text while a stranger on the open node's address floods the first member."""
    path = tmp_path / "swarm.key"
    SwarmKey.generate().write(path)
    lan = lan_factory(4)
    first, second, outsider_host, client = lan.hosts
    started = []

    def node(host, *args: str):
        mdns = ["--mdns", "--mdns-interface", host.address, "--host", host.address, "--gossip-period", PERIOD]
        (started_node,) = start_nodes([[*mdns, *args]], tmp_path / host.namespace, prefix=["ip", "netns", "exec", host.namespace])
        started.append(started_node)
        return started_node

    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # side by side: nobody names a bootstrap peer
            starting = [
                pool.submit(node, first, "--blocks", "0:15", "--swarm-key", str(path)),
                pool.submit(node, second, "--blocks", "15:30", "--swarm-key", str(path)),
                pool.submit(node, outsider_host, "--blocks", "0:30"),
            ]
            concurrent.futures.wait(starting)  # every node that started is in `started`, stopped below
        *members, outsider = [f.result() for f in starting]
        mdns = ["--mdns", "--mdns-interface", client.address, "--insecure-http", "--wait", "4"]
        ids = {m.peer_id for m in members}
        deadline = time.monotonic() + 60
        while True:  # the members' own tables, read from the client's namespace
            tables = [{p["peer_id"] for p in _cli_in(lan, client, "peers", "--bootstrap", m.url, "--insecure-http", "--swarm-key", str(path))["peers"]} for m in members]
            if all(table == ids for table in tables) or time.monotonic() > deadline:
                break
        assert all(table == ids for table in tables), tables
        found = {p["peer_id"] for p in _cli_in(lan, client, "peers", *mdns, "--swarm-key", str(path))["peers"]}
        assert found == ids
        assert {p["peer_id"] for p in _cli_in(lan, client, "peers", *mdns)["peers"]} == {outsider.peer_id}
        generate = ["generate", PROMPT, "--max-new-tokens", str(TOKENS), "--wire-dtype", "float32"]
        public = _cli_in(lan, client, *generate, "--bootstrap", outsider.url, "--insecure-http")
        # A stranger on its own address hammers the first member (more connections than one source
        # may hold) while a member generates beside it.
        argv = [sys.executable, str(ATTACKER), members[0].url, str(ATTACK_CONNECTIONS)]
        private, attack = beside_attacker(lan, outsider_host, argv, lambda: _cli_in(lan, client, *generate, *mdns, "--swarm-key", str(path)))
        assert private["text"] == public["text"] and private["text"]
        assert _peers(private["route"]) <= _short(members)
        assert set(attack["status"]) <= {"401", "503"} and attack["status"]["401"] > 0, attack  # refused or busy, never served
        assert attack["status"].get("503", 0) + attack["errors"] > 0, attack  # the per-source connection limit held too
        print(f"attacker answers: {attack}")
    finally:
        stop_nodes(started)
